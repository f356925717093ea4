//! The in-place passthrough mount, through a real FUSE mount: POSIX behaviour,
//! SQLite under concurrency in WAL and DELETE modes, mmap, locks, crash recovery.

mod common;

use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::mount::Mount;
use common::SeaweedFs;

/// Each test mounts against its own bucket on the shared SeaweedFS.
fn env() -> Vec<(String, String)> {
    let s3 = SeaweedFs::shared();
    let mut env = s3.env(&s3.new_bucket("pass"), "passthrough");
    env.push(("MEMBRIDGE_NODE_ID".into(), "node-a".into()));
    env
}

fn errno_of(e: std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

/// Re-run this test binary as a child process playing one role (SQLite writer,
/// reader, lock holder...), so concurrency is across real processes.
fn spawn_worker(role: &str, args: &[&str]) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "worker_entry",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("MB_WORKER", role)
        .env("MB_WORKER_ARGS", args.join("\u{1f}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn worker")
}

/// A worker's reports: its stdout lines that start with `@@ ` (libtest prints
/// its own lines around them).
fn finish(child: std::process::Child) -> String {
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "worker failed: {stdout}");
    reports(&stdout)
}

fn reports(stdout: &str) -> String {
    stdout
        .split('\n')
        .filter_map(|l| l.split_once("@@ ").map(|(_, r)| r))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
#[ignore = "entry point of worker processes spawned by the other tests"]
fn worker_entry() {
    let Ok(role) = std::env::var("MB_WORKER") else {
        return;
    };
    let args: Vec<String> = std::env::var("MB_WORKER_ARGS")
        .unwrap_or_default()
        .split('\u{1f}')
        .map(String::from)
        .collect();
    match role.as_str() {
        "sql-writer" => sql_writer(&args[0], &args[1], args[2].parse().unwrap()),
        "sql-reader" => sql_reader(&args[0], &args[1]),
        "lock-holder" => lock_holder(&args[0], args[1].parse().unwrap()),
        "mmap-reader" => mmap_reader(&args[0], args[1].parse().unwrap()),
        "create-modes" => create_modes(&args[0], u32::from_str_radix(&args[1], 8).unwrap()),
        other => panic!("unknown worker role {other}"),
    }
}

fn open_db(path: &str, mode: &str) -> rusqlite::Connection {
    let c = rusqlite::Connection::open(path).unwrap();
    c.busy_timeout(Duration::from_secs(30)).unwrap();
    let got: String = c
        .query_row(&format!("PRAGMA journal_mode={mode}"), [], |r| r.get(0))
        .unwrap();
    assert_eq!(got.to_lowercase(), mode.to_lowercase());
    c.execute_batch("PRAGMA synchronous=NORMAL").unwrap();
    c
}

/// Each transaction inserts one row and bumps a running total, so a reader can
/// check that it never sees half a transaction.
fn sql_writer(path: &str, mode: &str, n: u32) {
    let mut c = open_db(path, mode);
    for i in 0..n {
        let tx = c.transaction().unwrap();
        tx.execute(
            "INSERT INTO t(v, pad) VALUES (?1, randomblob(200))",
            [i as i64],
        )
        .unwrap();
        tx.execute("UPDATE total SET n = n + 1, s = s + ?1", [i as i64])
            .unwrap();
        tx.commit().unwrap();
    }
    println!("@@ wrote {n}");
}

fn sql_reader(path: &str, mode: &str) {
    let c = open_db(path, mode);
    let mut seen = 0i64;
    let mut checks = 0;
    let stop = Path::new(path).with_extension("done");
    loop {
        let done = stop.exists();
        let (count, sum, n, s): (i64, i64, i64, i64) = c
            .query_row(
                "SELECT (SELECT count(*) FROM t), (SELECT coalesce(sum(v),0) FROM t), n, s FROM total",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .unwrap();
        assert_eq!((count, sum), (n, s), "reader saw a partial transaction");
        assert!(count >= seen, "row count went backwards");
        seen = count;
        checks += 1;
        if done {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    println!("@@ checked {checks} snapshots, last {seen}");
}

fn lock_holder(path: &str, hold_ms: u64) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let fl = libc::flock {
        l_type: libc::F_WRLCK as i16,
        l_whence: libc::SEEK_SET as i16,
        l_start: 100,
        l_len: 10,
        l_pid: 0,
    };
    // SAFETY: `f` is open for the call and `fl` a live flock F_SETLK only reads.
    assert_eq!(unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLK, &fl) }, 0);
    println!("\n@@ locked");
    std::io::stdout().flush().unwrap();
    std::thread::sleep(Duration::from_millis(hold_ms));
    drop(f); // closing releases the lock
}

fn mmap_reader(path: &str, len: usize) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    // SAFETY: a fresh mapping chosen by the kernel (null hint) of an open fd;
    // it overlaps no memory Rust owns.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    // SAFETY: `p` is a successful (asserted) readable mapping of `len` bytes,
    // never unmapped in this short-lived worker; the writer finished writing
    // before it started the worker, so nothing changes the bytes while read.
    let bytes = unsafe { std::slice::from_raw_parts(p as *const u8, len) };
    println!("\n@@ {}", String::from_utf8_lossy(&bytes[..11]));
}

fn setup_db(path: &Path, mode: &str) {
    let c = open_db(path.to_str().unwrap(), mode);
    c.execute_batch(
        "CREATE TABLE t(id INTEGER PRIMARY KEY, v INTEGER, pad BLOB);
         CREATE TABLE total(n INTEGER, s INTEGER);
         INSERT INTO total VALUES (0, 0);",
    )
    .unwrap();
}

fn integrity_and_count(path: &Path) -> (String, i64) {
    let c = rusqlite::Connection::open(path).unwrap();
    let ok: String = c
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    let n: i64 = c
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap();
    (ok, n)
}

fn concurrent_sqlite(mode: &str) {
    const N: u32 = 2000;
    let m = Mount::with_files(env(), &[]);
    let db = m.dir.join("claude-mem.db");
    setup_db(&db, mode);
    let dbs = db.to_str().unwrap();
    let readers: Vec<_> = (0..2)
        .map(|_| spawn_worker("sql-reader", &[dbs, mode]))
        .collect();
    let writer = spawn_worker("sql-writer", &[dbs, mode, &N.to_string()]);
    let out = finish(writer);
    assert!(out.contains(&format!("wrote {N}")), "{out}");
    fs::write(db.with_extension("done"), b"").unwrap();
    for r in readers {
        let out = finish(r);
        assert!(out.contains("checked"), "{out}");
    }
    assert_eq!(integrity_and_count(&db), ("ok".into(), N as i64));
    m.unmount();
    assert!(!m.is_mounted());
    assert_eq!(integrity_and_count(&db), ("ok".into(), N as i64));
}

#[test]
fn sqlite_wal_one_writer_two_readers() {
    concurrent_sqlite("wal");
}

#[test]
fn sqlite_delete_one_writer_two_readers() {
    concurrent_sqlite("delete");
}

#[test]
fn files_before_mount_stay_and_writes_land_in_dir() {
    let m = Mount::with_files(
        env(),
        &[("keep.txt", b"before"), ("logs/old.log", b"line1\n")],
    );
    assert_eq!(fs::read(m.dir.join("keep.txt")).unwrap(), b"before");
    assert_eq!(fs::read(m.dir.join("logs/old.log")).unwrap(), b"line1\n");
    let mut names: Vec<_> = fs::read_dir(&m.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, [".membridge", "keep.txt", "logs"]);

    fs::write(m.dir.join("new.txt"), b"through the mount").unwrap();
    fs::create_dir(m.dir.join("chroma")).unwrap();
    fs::write(m.dir.join("chroma/x.bin"), vec![7u8; 300_000]).unwrap();
    let status = m.status();
    assert_eq!(status["node_id"], "node-a");
    assert_eq!(status["canonical_id"], "f534b1417999d48f");
    assert_eq!(
        status["classes"]["replicated_databases"][0],
        "claude-mem.db"
    );
    m.unmount();
    assert_eq!(
        fs::read(m.dir.join("new.txt")).unwrap(),
        b"through the mount"
    );
    assert_eq!(
        fs::read(m.dir.join("chroma/x.bin")).unwrap(),
        vec![7u8; 300_000]
    );
    assert_eq!(fs::read(m.dir.join("keep.txt")).unwrap(), b"before");
    assert!(
        !m.dir.join(".membridge").exists(),
        "virtual dir must not reach the disk"
    );
}

#[test]
fn posix_semantics_and_errnos() {
    let m = Mount::with_files(env(), &[("a", b"aaa"), ("b", b"bbb")]);
    let d = &m.dir;
    // atomic rename over an existing file
    fs::rename(d.join("a"), d.join("b")).unwrap();
    assert_eq!(fs::read(d.join("b")).unwrap(), b"aaa");
    assert_eq!(
        errno_of(fs::metadata(d.join("a")).unwrap_err()),
        libc::ENOENT
    );
    // O_APPEND from two handles interleaves without overwriting
    let mut f1 = OpenOptions::new().append(true).open(d.join("b")).unwrap();
    let mut f2 = OpenOptions::new().append(true).open(d.join("b")).unwrap();
    f1.write_all(b"1").unwrap();
    f2.write_all(b"2").unwrap();
    f1.write_all(b"3").unwrap();
    assert_eq!(fs::read(d.join("b")).unwrap(), b"aaa123");
    // O_EXCL
    let e = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(d.join("b"))
        .unwrap_err();
    assert_eq!(errno_of(e), libc::EEXIST);
    // rmdir of a non-empty dir, unlink of a dir
    fs::create_dir_all(d.join("x/y")).unwrap();
    assert_eq!(
        errno_of(fs::remove_dir(d.join("x")).unwrap_err()),
        libc::ENOTEMPTY
    );
    assert_eq!(
        errno_of(fs::remove_file(d.join("x")).unwrap_err()),
        libc::EISDIR
    );
    // symlink, readlink, hard link
    std::os::unix::fs::symlink("b", d.join("s")).unwrap();
    assert_eq!(fs::read_link(d.join("s")).unwrap(), Path::new("b"));
    assert_eq!(fs::read(d.join("s")).unwrap(), b"aaa123");
    fs::hard_link(d.join("b"), d.join("h")).unwrap();
    assert_eq!(fs::metadata(d.join("h")).unwrap().nlink(), 2);
    // chmod, truncate, utimens
    fs::set_permissions(d.join("b"), fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(fs::metadata(d.join("b")).unwrap().mode() & 0o777, 0o600);
    let f = OpenOptions::new().write(true).open(d.join("b")).unwrap();
    f.set_len(2).unwrap();
    assert_eq!(fs::read(d.join("b")).unwrap(), b"aa");
    let t = std::time::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
    f.set_times(fs::FileTimes::new().set_modified(t)).unwrap();
    assert_eq!(fs::metadata(d.join("b")).unwrap().mtime(), 1_000_000_000);
    // read at offsets, seek
    let mut r = fs::File::open(d.join("h")).unwrap();
    r.seek(SeekFrom::Start(1)).unwrap();
    let mut s = String::new();
    r.read_to_string(&mut s).unwrap();
    assert_eq!(s, "a");
    // statfs answers with the backing filesystem's numbers
    // SAFETY: `statvfs` is a plain C struct of integers: all-zero is valid.
    let mut sv: libc::statvfs = unsafe { std::mem::zeroed() };
    let c = std::ffi::CString::new(d.to_str().unwrap()).unwrap();
    // SAFETY: `c` is NUL-terminated and `sv` live and writable for the call.
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut sv) }, 0);
    assert!(sv.f_blocks > 0 && sv.f_bsize > 0);
    // the virtual dir is read-only and cannot be shadowed
    assert!(fs::write(d.join(".membridge/status.json"), b"x").is_err());
    assert!(fs::create_dir(d.join(".membridge")).is_err());
    // rename within and across directories
    fs::rename(d.join("x"), d.join("z")).unwrap();
    fs::write(d.join("z/y/f"), b"deep").unwrap();
    fs::rename(d.join("z/y/f"), d.join("f")).unwrap();
    assert_eq!(fs::read(d.join("f")).unwrap(), b"deep");
    drop((f1, f2, f, r));
    m.unmount();
    assert_eq!(fs::read(d.join("f")).unwrap(), b"deep");
    assert!(d.join("z/y").is_dir());
}

#[test]
fn shared_mmap_write_is_visible_to_another_process() {
    let m = Mount::with_files(env(), &[("claude-mem.db-shm", &[0u8; 32768])]);
    let path = m.dir.join("claude-mem.db-shm");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let len = 32768;
    // SAFETY: a fresh mapping chosen by the kernel (null hint) of an open fd;
    // it overlaps no memory Rust owns.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    // SAFETY: `p` is a successful (asserted) writable mapping of 32768 bytes,
    // so 11 bytes fit; the source is a static array that cannot overlap it.
    unsafe { std::ptr::copy_nonoverlapping(b"hello mmap!".as_ptr(), p as *mut u8, 11) };
    let out = finish(spawn_worker(
        "mmap-reader",
        &[path.to_str().unwrap(), &len.to_string()],
    ));
    assert_eq!(out.trim_end(), "hello mmap!");
    // SAFETY: `p`/`len` are exactly the mapping made above, still mapped.
    assert_eq!(unsafe { libc::msync(p, len, libc::MS_SYNC) }, 0);
    // SAFETY: as above; no reference into the mapping outlives this call.
    unsafe { libc::munmap(p, len) };
    drop(f);
    m.unmount();
    assert_eq!(&fs::read(&path).unwrap()[..11], b"hello mmap!");
}

#[test]
fn fcntl_locks_block_and_fail_across_processes() {
    let m = Mount::with_files(env(), &[("lockfile", &[0u8; 4096])]);
    let path = m.dir.join("lockfile");
    let mut holder = spawn_worker("lock-holder", &[path.to_str().unwrap(), "1500"]);
    let mut reader = std::io::BufReader::new(holder.stdout.take().unwrap());
    loop {
        let mut line = String::new();
        assert!(
            std::io::BufRead::read_line(&mut reader, &mut line).unwrap() > 0,
            "lock holder exited before locking"
        );
        if line.trim_end() == "@@ locked" {
            break;
        }
    }

    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let mut fl = libc::flock {
        l_type: libc::F_WRLCK as i16,
        l_whence: libc::SEEK_SET as i16,
        l_start: 105,
        l_len: 1,
        l_pid: 0,
    };
    // F_GETLK reports the holder
    let mut probe = fl;
    assert_eq!(
        // SAFETY: `f` is open; F_GETLK fills the live local `probe`.
        unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETLK, &mut probe) },
        0
    );
    assert_eq!(probe.l_type, libc::F_WRLCK as i16);
    assert_eq!(probe.l_pid as u32, holder.id());
    // F_SETLK fails at once
    // SAFETY: `f` is open; F_SETLK only reads the live local `fl`.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLK, &fl) };
    assert_eq!(r, -1);
    let e = std::io::Error::last_os_error().raw_os_error().unwrap();
    assert!(e == libc::EAGAIN || e == libc::EACCES, "errno {e}");
    // a range that does not overlap is free
    let mut other = fl;
    other.l_start = 0;
    other.l_len = 50;
    assert_eq!(
        // SAFETY: as above, with the live local `other`.
        unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLK, &other) },
        0
    );
    // F_SETLKW waits until the holder lets go
    let t = Instant::now();
    fl.l_type = libc::F_WRLCK as i16;
    assert_eq!(
        // SAFETY: as above; F_SETLKW only blocks until the lock is granted.
        unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLKW, &fl) },
        0
    );
    let waited = t.elapsed();
    assert!(
        waited > Duration::from_millis(500),
        "F_SETLKW returned after {waited:?}"
    );
    holder.wait().unwrap();
}

#[test]
fn kill_9_then_mount_again_recovers() {
    let m = Mount::with_files(env(), &[("keep.txt", b"safe")]);
    let db = m.dir.join("claude-mem.db");
    setup_db(&db, "wal");
    {
        let c = open_db(db.to_str().unwrap(), "wal");
        for i in 0..100 {
            c.execute("INSERT INTO t(v) VALUES (?1)", [i]).unwrap();
        }
    }
    let pid = m.pid();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        errno_of(fs::metadata(m.dir.join("keep.txt")).unwrap_err()),
        libc::ENOTCONN,
        "a killed daemon leaves a stale mount"
    );
    m.mount(); // clears the stale mount itself
    assert_ne!(m.pid(), pid);
    assert_eq!(fs::read(m.dir.join("keep.txt")).unwrap(), b"safe");
    assert_eq!(integrity_and_count(&db), ("ok".into(), 100));
}

/// The kernel hands a new mount the FUSE device number an unmounted one
/// just gave back: a watchdog of the old mount, started late by a test as
/// if it had only now seen its daemon die, must leave the new one alone;
/// the new mount's own aborts it.
#[test]
fn a_watchdog_aborts_its_own_mount_and_no_later_one() {
    let minor_of = |m: &Mount| libc::minor(fs::metadata(&m.dir).unwrap().dev());
    let a = Mount::with_files(env(), &[]);
    let old = watchdog_args(a.pid()).expect("the daemon has a watchdog");
    a.unmount();
    let mut b = Mount::with_files(env(), &[]);
    for _ in 0..3 {
        if minor_of(&b).to_string() == old[0] {
            break;
        }
        b.unmount();
        b = Mount::with_files(env(), &[]);
    }
    let dead = {
        let mut c = Command::new("true").spawn().unwrap();
        c.wait().unwrap();
        c.id().to_string()
    };
    let watchdog = |args: &[String]| {
        let st = Command::new(common::mount::BIN)
            .arg("__watchdog")
            .arg(&dead)
            .args(args)
            .status()
            .unwrap();
        assert!(st.success());
    };
    watchdog(&old);
    assert!(b.is_mounted());
    assert!(
        fs::read(b.dir.join(".membridge/status.json")).is_ok(),
        "left alone"
    );
    let own = watchdog_args(b.pid()).expect("the daemon has a watchdog");
    watchdog(&own);
    // At once ENOTCONN; moments later the daemon, cut off, unmounts (and
    // the path is the bare directory's, which has no `.membridge/`).
    let read = fs::read(b.dir.join(".membridge/status.json"));
    let cut_off =
        matches!(&read, Err(e) if e.raw_os_error() == Some(libc::ENOTCONN)) || !b.is_mounted();
    assert!(cut_off, "the mount's own watchdog aborted it: {read:?}");
    b.mount(); // clears the aborted mount
    b.unmount();
}

/// The arguments after `__watchdog PID` of the watchdog watching `pid`.
fn watchdog_args(pid: i32) -> Option<Vec<String>> {
    fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let cmd = fs::read(e.path().join("cmdline")).ok()?;
        let args: Vec<String> = cmd
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let at = args.iter().position(|a| a == "__watchdog")?;
        (args.get(at + 1)? == &pid.to_string()).then(|| {
            args[at + 2..]
                .iter()
                .filter(|a| !a.is_empty())
                .cloned()
                .collect()
        })
    })
}

#[test]
fn sigterm_unmounts_cleanly() {
    let m = Mount::with_files(env(), &[]);
    fs::write(m.dir.join("x"), b"1").unwrap();
    let pid = nix::unistd::Pid::from_raw(m.pid());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while (m.is_mounted() || nix::sys::signal::kill(pid, None).is_ok()) && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!m.is_mounted(), "SIGTERM left the mount in place");
    assert!(
        nix::sys::signal::kill(pid, None).is_err(),
        "daemon still running"
    );
    assert_eq!(fs::read(m.dir.join("x")).unwrap(), b"1");
}

#[test]
fn mounting_twice_is_refused_and_unmount_of_unmounted_fails() {
    let m = Mount::with_files(env(), &[]);
    let out = m.run(&["mount", m.dir.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already mounted"));
    m.unmount();
    let out = m.run(&["unmount", m.dir.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not mounted"));
}

/// The daemon writes as root; an unprivileged writer must still lose the
/// set-id bits it would lose on the bare directory (the kernel leaves that
/// to the daemon once KILLPRIV_V2 is negotiated).
#[test]
fn unprivileged_writes_clear_set_id_bits_as_on_the_bare_dir() {
    use std::os::unix::fs::PermissionsExt;
    let m = Mount::with_files(env(), &[]);
    let bare = tempfile::tempdir().unwrap();
    let mut seen = Vec::new();
    for dir in [bare.path(), m.dir.as_path()] {
        // nobody must reach the files
        for d in [dir, dir.parent().unwrap()] {
            fs::set_permissions(d, fs::Permissions::from_mode(0o755)).unwrap();
        }
        let mut modes = Vec::new();
        for (name, script) in [
            ("appended", "printf x >> \"$0\""),
            ("truncated", ": > \"$0\""),
        ] {
            let f = dir.join(name);
            fs::write(&f, b"data").unwrap();
            fs::set_permissions(&f, fs::Permissions::from_mode(0o6777)).unwrap();
            let out = std::process::Command::new("setpriv")
                .args([
                    "--reuid=65534",
                    "--regid=65534",
                    "--clear-groups",
                    "sh",
                    "-c",
                    script,
                ])
                .arg(&f)
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
            modes.push(fs::metadata(&f).unwrap().permissions().mode() & 0o7777);
        }
        seen.push(modes);
    }
    assert_eq!(seen[0], [0o777, 0o777], "the bare directory");
    assert_eq!(
        seen[1], seen[0],
        "the mount must behave as the bare directory"
    );
}

/// Under `umask`, creates files, directories and a FIFO in `dir` with
/// explicit modes and reports the modes they got.
fn create_modes(dir: &str, umask: u32) {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    // SAFETY: umask takes no pointers and cannot fail (this worker process
    // is single-threaded, so no other thread's file creation is affected).
    unsafe { libc::umask(umask as libc::mode_t) };
    let dir = Path::new(dir);
    for (name, mode) in [("f620", 0o620), ("f666", 0o666), ("f777", 0o777)] {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(dir.join(name))
            .unwrap();
    }
    for (name, mode) in [("d777", 0o777), ("d750", 0o750)] {
        fs::DirBuilder::new()
            .mode(mode)
            .create(dir.join(name))
            .unwrap();
    }
    let fifo = std::ffi::CString::new(dir.join("p666").to_str().unwrap()).unwrap();
    // SAFETY: `fifo` is NUL-terminated and outlives the call.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o666) }, 0);
    for name in ["f620", "f666", "f777", "d777", "d750", "p666"] {
        let mode = fs::symlink_metadata(dir.join(name)).unwrap().mode() & 0o7777;
        println!("@@ {name} {mode:o}");
    }
}

/// Issue 11, item 9: files, directories and nodes created through the mount
/// get exactly the mode the caller's umask gives them on the bare directory,
/// whatever the daemon's own umask.
#[test]
fn created_modes_follow_the_callers_umask_as_on_the_bare_dir() {
    let m = Mount::with_files(env(), &[]);
    for umask in ["0", "22", "77"] {
        let bare = tempfile::tempdir().unwrap();
        let mounted = m.dir.join(format!("u{umask}"));
        fs::create_dir(&mounted).unwrap();
        fs::set_permissions(&mounted, fs::Permissions::from_mode(0o777)).unwrap();
        let want = finish(spawn_worker(
            "create-modes",
            &[bare.path().to_str().unwrap(), umask],
        ));
        let got = finish(spawn_worker(
            "create-modes",
            &[mounted.to_str().unwrap(), umask],
        ));
        assert_eq!(
            got, want,
            "umask {umask}: the mount differs from the bare dir"
        );
        if umask == "0" {
            assert!(
                want.contains("f620 620") && want.contains("d777 777"),
                "{want}"
            );
        }
    }
    // The daemon's own files (a base image, made on a FUSE thread at the
    // database's first write) keep the umask the daemon was started with.
    let status = fs::read_to_string("/proc/self/status").unwrap();
    let ours = status
        .lines()
        .find_map(|l| l.strip_prefix("Umask:"))
        .map(|u| u32::from_str_radix(u.trim(), 8).unwrap())
        .unwrap();
    let c = rusqlite::Connection::open(m.dir.join("claude-mem.db")).unwrap();
    c.execute_batch("CREATE TABLE t(x)").unwrap();
    drop(c);
    // (the state dir of each project is under MEMBRIDGE_STATE_DIR)
    let bases: Vec<_> = fs::read_dir(&m.state)
        .unwrap()
        .filter_map(|e| fs::read_dir(e.unwrap().path().join("base")).ok())
        .flatten()
        .collect();
    assert!(!bases.is_empty());
    for e in bases {
        let mode = e.unwrap().metadata().unwrap().mode() & 0o777;
        assert_eq!(mode, 0o666 & !ours, "a base image under umask {ours:o}");
    }
}

/// Reads `chroma/pre.bin` (in the directory before the mount, so not in the
/// kernel's cache), writes `n` blocks to a local path with one write(2)
/// each and reads them back; returns the daemon's READ/WRITE counts for
/// local paths meanwhile.
fn local_io_through_daemon(m: &Mount, n: usize) -> (u64, u64) {
    let before = m.status()["io"].clone();
    assert_eq!(fs::read(m.dir.join("chroma/pre.bin")).unwrap(), PRE);
    fs::create_dir_all(m.dir.join("logs")).unwrap();
    let path = m.dir.join("logs/worker.log");
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .unwrap();
    for i in 0..n {
        f.write_all(&[(i % 251) as u8; 4096]).unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    // A fresh open and an O_DIRECT-free read of all of it.
    let back = fs::read(&path).unwrap();
    assert_eq!(back.len(), n * 4096);
    assert!(back
        .chunks(4096)
        .enumerate()
        .all(|(i, c)| c.iter().all(|&b| b == (i % 251) as u8)));
    let after = m.status()["io"].clone();
    let delta =
        |k: &str| after[k]["local"].as_u64().unwrap() - before[k]["local"].as_u64().unwrap();
    (delta("daemon_reads"), delta("daemon_writes"))
}

const PRE: &[u8] = &[9u8; 256 * 1024];

/// Kernel passthrough in use: 1,000 writes and the read-back of a local path
/// reach the daemon not once (counted by the daemon itself), while the
/// replicated database's writes still do, and the bytes are in the
/// directory once unmounted.
#[test]
fn local_paths_are_served_by_the_kernel() {
    let m = Mount::with_files(env(), &[("chroma/pre.bin", PRE)]);
    let io = m.status()["io"].clone();
    assert_eq!(io["passthrough"], "on", "{io}\n{}", m.log_tail(20));
    let (reads, writes) = local_io_through_daemon(&m, 1000);
    assert_eq!((reads, writes), (0, 0), "local I/O reached the daemon");
    assert!(m.status()["io"]["kernel_opens"].as_u64().unwrap() >= 2);

    let doctor = m.run(&["doctor", m.dir.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&doctor.stdout);
    assert!(
        text.contains("passthrough") && text.contains("on:"),
        "{text}"
    );
    m.unmount();
    assert_eq!(
        fs::metadata(m.dir.join("logs/worker.log")).unwrap().len(),
        1000 * 4096
    );
}

/// A database in WAL mode on the primary is served by the kernel too: its
/// writes never reach the daemon, and every commit is still captured (read
/// from the WAL after the fact) and published.
#[test]
fn wal_databases_are_served_by_the_kernel_and_their_commits_tailed() {
    let m = Mount::with_files(env(), &[]);
    let db = m.dir.join("claude-mem.db");
    // The first connection creates it on the daemon's path; once it closed,
    // the database is armed for passthrough.
    setup_db(&db, "wal");
    let mode = |m: &Mount| m.status()["io"]["databases"]["claude-mem.db"].clone();
    common::wait_for(
        "the database to be served by the kernel",
        Duration::from_secs(10),
        || mode(&m) == "kernel",
    );
    let head = |m: &Mount| {
        m.status()["databases"]["claude-mem.db"]["head_txid"]
            .as_u64()
            .unwrap_or(0)
    };
    let sidecar_writes = |m: &Mount| {
        m.status()["io"]["daemon_writes"]["database-sidecar"]
            .as_u64()
            .unwrap()
    };
    let db_writes = |m: &Mount| {
        m.status()["io"]["daemon_writes"]["replicated-database"]
            .as_u64()
            .unwrap()
    };
    let (h0, w0, d0) = (head(&m), sidecar_writes(&m), db_writes(&m));
    let c = open_db(db.to_str().unwrap(), "wal");
    // Enough frames for the tailer's own checkpoint to run and the WAL to
    // start over underneath it.
    let t = Instant::now();
    for i in 0..3000 {
        c.execute("INSERT INTO t(v, pad) VALUES (?1, randomblob(2000))", [i])
            .unwrap();
    }
    let wrote = t.elapsed();
    let caught_up = common::wait_for("every commit captured", Duration::from_secs(20), || {
        head(&m) >= h0 + 3000
    });
    eprintln!("3000 commits in {wrote:?}, all captured {caught_up:?} later");
    assert_eq!(head(&m), h0 + 3000, "one txid per commit");
    // What still reaches the daemon is the wal-index's write-back (-shm is
    // mapped through the page cache): far from one write per frame.
    let sidecar = sidecar_writes(&m) - w0;
    assert!(sidecar < 300, "-wal writes reached the daemon: {sidecar}");
    assert_eq!(db_writes(&m), d0, "database writes reached the daemon");
    common::wait_for("everything published", Duration::from_secs(30), || {
        let d = m.status()["databases"]["claude-mem.db"].clone();
        d["uploaded_txid"] == d["head_txid"]
    });
    // A connection may not leave WAL mode while the kernel serves it: the
    // daemon would not see the writes that follow.
    let err = c
        .query_row("PRAGMA journal_mode=DELETE", [], |r| r.get::<_, String>(0))
        .map(|m| m.to_lowercase());
    assert_ne!(
        err.ok().as_deref(),
        Some("delete"),
        "left WAL mode under passthrough"
    );
    drop(c);
    let wal_len = fs::metadata(m.dir.join("claude-mem.db-wal")).map_or(0, |m| m.len());
    assert!(
        wal_len < 64 << 20,
        "the WAL was never checkpointed: {wal_len} bytes"
    );
    m.unmount();
    assert_eq!(integrity_and_count(&db), ("ok".to_string(), 3000));
}

/// `MEMBRIDGE_PASSTHROUGH=off`: today's path, chosen at mount and named in
/// status.json, the log and `membridge doctor`.
#[test]
fn passthrough_off_falls_back_to_the_daemon_and_says_so() {
    let mut e = env();
    e.push(("MEMBRIDGE_PASSTHROUGH".into(), "off".into()));
    let m = Mount::with_files(e, &[("chroma/pre.bin", PRE)]);
    let io = m.status()["io"].clone();
    assert_eq!(io["passthrough"], "off");
    let reason = io["passthrough_off_reason"].as_str().unwrap();
    assert!(reason.contains("MEMBRIDGE_PASSTHROUGH=off"), "{reason}");
    let (reads, writes) = local_io_through_daemon(&m, 200);
    assert!(
        writes >= 200 && reads >= 1,
        "reads {reads}, writes {writes}"
    );
    assert_eq!(m.status()["io"]["kernel_opens"], 0);
    assert!(m.log_tail(50).contains("kernel passthrough off"));
    let doctor = m.run(&["doctor", m.dir.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&doctor.stdout);
    assert!(text.contains("MEMBRIDGE_PASSTHROUGH=off"), "{text}");
}
