//! Laying a database out under the mount: a bootstrap from the bucket, the
//! view's transactions, settling its WAL, and installing a file while
//! clients are kept out by a lock.

use super::*;

impl Follower {
    /// Rebuild the local copy from the latest snapshot and segments (verified
    /// by restore), keeping aside whatever the local file held.
    pub(super) async fn bootstrap(
        &self,
        db: &str,
        generation: u64,
    ) -> Result<Applied, FollowError> {
        let dir = self.state_dir.join("bootstrap");
        std::fs::create_dir_all(&dir).map_err(FollowError::io(dir.display()))?;
        let tmp = dir.join(db.replace('/', "%2F"));
        let report = restore::restore_with(
            self.store.as_ref(),
            &self.layout,
            &self.canonical_id,
            db,
            Target::Latest,
            &tmp,
            RestoreOptions {
                progress: true,
                force: true,
            },
        )
        .await?;
        // Hashed and installed from the file a buffer at a time: memory does
        // not grow with the database.
        let hashes = PageHashes::from_file(&tmp, report.page_size)
            .map_err(FollowError::io(tmp.display()))?;
        self.settle(db, false).await;
        self.keep_aside(db);
        let (rt, name, src) = (self.read_through.clone(), db.to_string(), tmp.clone());
        let installed = self
            .locked_install(db, move |f| {
                rt.remove(&name);
                let len = copy_at(&src, f)?;
                f.set_len(len)
            })
            .await;
        match installed {
            Ok(()) => {}
            Err(FollowError::Busy(holder)) => {
                // Clients have it open: commit the image whole, as one WAL
                // transaction they see atomically.
                tracing::info!(db, %holder, "the database is open: applying the rebuilt copy as one transaction");
                // That transaction holds every page: the one path here
                // whose memory is the database's size (docs/ARCHITECTURE.md).
                self.read_through.remove(db);
                let image = std::fs::read(&tmp).map_err(FollowError::io(tmp.display()))?;
                let ps = report.page_size as usize;
                let pages = image
                    .chunks(ps)
                    .enumerate()
                    .map(|(i, p)| (i as u32 + 1, Bytes::copy_from_slice(p)))
                    .filter(|(n, _)| *n != crate::sqlite::header::lock_byte_page(report.page_size))
                    .collect();
                let size_pages = (image.len() / ps) as u32;
                self.apply_view(db, vec![ViewTxn { pages, size_pages }])
                    .await?;
            }
            Err(e) => return Err(e),
        }
        let _ = std::fs::remove_file(&tmp);
        self.status.metrics().bootstrap(db);
        tracing::info!(db, txid = report.txid, "local copy rebuilt from the bucket");
        Ok(Applied {
            txid: report.txid,
            generation,
            checksum: report.checksum,
            page_size: report.page_size,
            hashes: Some(hashes),
            committed_ms: report.commit_ms,
        })
    }

    /// Before replacing a local database that is not the bucket's: keep a
    /// copy of it and its `-wal` aside (see [`keep_aside`]).
    pub(super) fn keep_aside(&self, db: &str) {
        keep_aside(&self.backing.join(db), db, &self.state_dir, true);
    }

    /// Commits verified transactions into the view (one SQLite transaction
    /// each) on the applier's thread.
    pub(super) async fn apply_view(&self, db: &str, txns: Vec<ViewTxn>) -> Result<(), FollowError> {
        let Some(applier) = self.node.applier().cloned() else {
            return Err(FollowError::NoApplier);
        };
        let name = db.to_string();
        tokio::task::spawn_blocking(move || applier.apply(&name, txns))
            .await?
            .map_err(FollowError::Apply)
    }

    /// Folds the view's WAL into the main file (opening the view first when
    /// `open`); `false` if that could not be done now (a reader kept the WAL
    /// busy, or the file is not a database the view can open).
    pub(super) async fn settle(&self, db: &str, open: bool) -> bool {
        let Some(applier) = self.node.applier().cloned() else {
            return true;
        };
        let name = db.to_string();
        let res = tokio::task::spawn_blocking(move || match open {
            true => applier.settle_open(&name),
            false => applier.settle(&name),
        })
        .await;
        match res {
            Ok(Ok(_)) => true,
            Ok(Err(e)) => {
                tracing::debug!(db, error = %e, "view not settled");
                false
            }
            Err(_) => false,
        }
    }

    /// Run `write` on the backing file while no connection has the database
    /// open: the applier's own is closed first, and SQLite's PENDING and
    /// EXCLUSIVE locks are taken through the mount with a bounded wait
    /// ([`FollowError::Busy`] names who holds it). The view is reopened after,
    /// so the `-wal` exists before any client looks for it.
    pub(super) async fn locked_install(
        &self,
        db: &str,
        write: impl FnOnce(&std::fs::File) -> std::io::Result<()> + Send + 'static,
    ) -> Result<(), FollowError> {
        let through_mount = self.mount_dir.join(db);
        let backing = self.backing.join(db);
        let inval = self.invalidator.clone();
        let name = db.to_string();
        let state_dir = self.state_dir.clone();
        let applier = self.node.applier().cloned();
        let res = tokio::task::spawn_blocking(move || -> Result<(), FollowError> {
            if let Some(a) = &applier {
                a.close(Some(&name)).map_err(FollowError::Close)?;
            }
            let io = |source| FollowError::Io {
                what: format!("{name}: applying"),
                source,
            };
            // Create it underneath first: through the mount a non-primary
            // refuses creating replicated files, the daemon's own included.
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(&backing)
                .map_err(io)?;
            inval.invalidate_entry(&name);
            let guard = lock_exclusive(&through_mount)?;
            // Nobody has it open now (WAL connections keep a shared lock on
            // the database): a WAL left behind would be replayed over these
            // pages by the next opener.
            if ["-wal", "-shm"]
                .iter()
                .any(|x| std::fs::metadata(format!("{}{x}", backing.display())).is_ok())
            {
                keep_aside(&backing, &name, &state_dir, false);
                for suffix in ["-wal", "-shm"] {
                    let _ = std::fs::remove_file(format!("{}{suffix}", backing.display()));
                }
                inval.invalidate_entry(&format!("{name}-wal"));
                inval.invalidate_entry(&format!("{name}-shm"));
            }
            write(&f).map_err(io)?;
            inval.invalidate(&name, &[]);
            drop(guard);
            if let Some(a) = &applier {
                a.forget_page1(&name);
            }
            Ok(())
        })
        .await?;
        res?;
        // Open the view again (it creates the -wal clients will need).
        self.settle(db, true).await;
        Ok(())
    }
}

/// Copy a local database (`with_main`) and its `-wal` to the state dir:
/// never silently dropped.
pub(super) fn keep_aside(main: &Path, db: &str, state_dir: &Path, with_main: bool) {
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%SZ");
    let dir = state_dir.join("replaced");
    let suffixes: &[&str] = if with_main { &["", "-wal"] } else { &["-wal"] };
    for suffix in suffixes {
        let src = PathBuf::from(format!("{}{suffix}", main.display()));
        if std::fs::metadata(&src).is_ok_and(|m| m.len() > 0) {
            let _ = std::fs::create_dir_all(&dir);
            let dst = dir.join(format!("{}-{stamp}{suffix}", db.replace('/', "%2F")));
            match std::fs::copy(&src, &dst) {
                Ok(_) => crate::replica::aside::kept(&src, &dst),
                Err(e) => tracing::warn!(error = %e, "could not keep the local copy aside"),
            }
        }
    }
}

/// How long the follower waits for clients to close the database before it
/// applies a rebuilt copy through the view instead.
pub(super) const LOCK_WAIT: Duration = Duration::from_secs(2);

/// An open fd holding SQLite's PENDING and EXCLUSIVE locks; closing releases.
/// Never blocks a reader for long: each try takes PENDING, then the SHARED
/// range without waiting, and lets PENDING go again when a reader is in, for
/// at most [`LOCK_WAIT`]; then [`FollowError::Busy`] names the holder.
pub(super) fn lock_exclusive(path: &Path) -> Result<std::fs::File, FollowError> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(FollowError::io(path.display()))?;
    let range = |start: u64, len: i64, kind: i32| libc::flock {
        l_type: kind as i16,
        l_whence: libc::SEEK_SET as i16,
        l_start: start as i64,
        l_len: len,
        l_pid: 0,
    };
    let pending = range(PENDING_BYTE, 1, libc::F_WRLCK);
    let shared = range(PENDING_BYTE + 2, 510, libc::F_WRLCK);
    let set = |fl: &libc::flock| {
        // SAFETY: `f` is an open fd for the whole call and `fl` a valid flock.
        unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLK, fl) == 0 }
    };
    let start = std::time::Instant::now();
    loop {
        if set(&pending) {
            if set(&shared) {
                return Ok(f);
            }
            set(&range(PENDING_BYTE, 1, libc::F_UNLCK));
        }
        if start.elapsed() > LOCK_WAIT {
            let mut probe = shared;
            // SAFETY: as above; F_GETLK only fills `probe`.
            let holder = if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETLK, &mut probe) } == 0
                && probe.l_type != libc::F_UNLCK as i16
            {
                let cmd = std::fs::read(format!("/proc/{}/cmdline", probe.l_pid))
                    .map(|c| {
                        String::from_utf8_lossy(&c)
                            .replace('\0', " ")
                            .trim()
                            .to_string()
                    })
                    .unwrap_or_default();
                format!("pid {} ({cmd})", probe.l_pid)
            } else {
                "another process".to_string()
            };
            return Err(FollowError::Busy(holder));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Copies the file at `src` over the start of `dst`, a buffer at a time;
/// returns the bytes copied.
pub(super) fn copy_at(src: &Path, dst: &std::fs::File) -> std::io::Result<u64> {
    use std::io::Read;
    let mut r = std::fs::File::open(src)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok(at);
        }
        dst.write_all_at(&buf[..n], at)?;
        at += n as u64;
    }
}
