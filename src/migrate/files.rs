//! The local side of a migration: the downloaded legacy image, the snapshot
//! encoded from it, the plan for the local database, its backup and the
//! install, in a work dir removed at the end.

use super::*;

/// The verified legacy image, as membridge's first snapshot sees it.
pub(super) struct Seed {
    pub(super) page_size: u32,
    pub(super) size_pages: u32,
    pub(super) checksum: u64,
    pub(super) stats: ImageStats,
    pub(super) digest: String,
}

impl Seed {
    pub(super) fn inspect(image: &Path) -> Result<Seed> {
        let what = || format!("the downloaded legacy snapshot {}", image.display());
        let mut first = [0u8; 100];
        let n = File::open(image)
            .and_then(|mut f| f.read(&mut first))
            .map_err(io(what()))?;
        let header = DbHeader::parse(&first[..n]).map_err(|e| {
            MigrateError::Refused(format!("{}: not a SQLite database: {e}", what()))
        })?;
        let len = std::fs::metadata(image).map_err(io(what()))?.len();
        let ps = header.page_size;
        if len % ps as u64 != 0
            || (header.size_is_valid() && header.size_in_pages as u64 * ps as u64 != len)
        {
            return Err(MigrateError::Refused(format!(
                "{}: {len} bytes do not make whole pages of {ps} bytes as its header says (truncated upload?)",
                what()
            )));
        }
        let conn = legacy::open_image(image).map_err(sql(what()))?;
        let check: String = conn
            .query_row("PRAGMA integrity_check(1)", [], |r| r.get(0))
            .map_err(sql(what()))?;
        if check != "ok" {
            return Err(MigrateError::Refused(format!(
                "{}: integrity_check failed: {check}",
                what()
            )));
        }
        let stats = legacy::stats(&conn).map_err(sql(what()))?;
        let digest = content_digest(&conn).map_err(sql(what()))?;
        let hashes = PageHashes::from_file(image, ps).map_err(io(what()))?;
        Ok(Seed {
            page_size: ps,
            size_pages: hashes.page_count(),
            checksum: hashes.checksum(),
            stats,
            digest,
        })
    }

    pub(super) fn head(&self) -> DbHead {
        DbHead {
            name: DB.to_string(),
            page_size: self.page_size,
            generation: SEED_GENERATION,
            head_txid: SEED_TXID,
            head_checksum: self.checksum,
            size_pages: self.size_pages,
            uploaded_txid: SEED_TXID,
            base_txid: SEED_TXID,
        }
    }

    /// The local journal already starts exactly at this seed.
    pub(super) fn is_head(&self, h: &DbHead) -> bool {
        h.generation == SEED_GENERATION
            && h.base_txid == SEED_TXID
            && h.page_size == self.page_size
            && (h.head_txid > SEED_TXID || h.head_checksum == self.checksum)
    }
}

pub(super) enum LocalPlan {
    /// The file already is the bucket's image.
    Keep,
    Install {
        backup: bool,
        why: String,
    },
}

pub(super) fn plan_local(local: &Path, seed: &Seed, sha: &str, replace: bool) -> Result<LocalPlan> {
    let len = match std::fs::metadata(local) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(io(local.display().to_string())(e)),
    };
    let wal = sidecar(local, "-wal");
    let wal_len = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
    if len == 0 && wal_len == 0 {
        return Ok(LocalPlan::Install {
            backup: false,
            why: "there is no local database".into(),
        });
    }
    if wal_len == 0 && sha256_file(local)? == sha {
        return Ok(LocalPlan::Keep);
    }
    let what = format!("the local database {}", local.display());
    // Read without creating sidecars: a dry run changes nothing.
    let conn = legacy::open_quiet(local);
    let local_stats = conn.and_then(|c| {
        c.busy_timeout(std::time::Duration::from_secs(5))?;
        Ok((legacy::stats(&c)?, content_digest(&c)?))
    });
    match local_stats {
        Ok((_, digest)) if digest == seed.digest => Ok(LocalPlan::Install {
            backup: true,
            why: "same content as the bucket's copy".into(),
        }),
        Ok(_) | Err(_) if replace => Ok(LocalPlan::Install {
            backup: true,
            why: "--replace-local".into(),
        }),
        Ok((stats, _)) => Err(MigrateError::Refused(format!(
            "{what} differs from the bucket's legacy snapshot (local: {}; bucket: {}): if this machine is the freshest, push it with the old tool first and migrate again; to take the bucket's copy instead, pass --replace-local (the local one is backed up first)",
            stats.describe(),
            seed.stats.describe()
        ))),
        Err(e) => Err(MigrateError::Refused(format!(
            "{what} cannot be read ({e}): move it away, or pass --replace-local to take the bucket's copy"
        ))),
    }
}

/// A digest of a database's logical content: schema, `user_version` and every
/// row of every table in scan order. Equal for a database and its
/// `VACUUM INTO` copy (which the old tool uploads), whose bytes differ.
pub(crate) fn content_digest(conn: &rusqlite::Connection) -> rusqlite::Result<String> {
    use rusqlite::types::ValueRef;
    let mut h = Sha256::new();
    let put = |h: &mut Sha256, tag: u8, b: &[u8]| {
        h.update([tag]);
        h.update((b.len() as u64).to_be_bytes());
        h.update(b);
    };
    let uv: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    put(&mut h, b'u', &uv.to_be_bytes());
    let objects: Vec<(String, String, Option<String>)> = conn
        .prepare("SELECT type, name, sql FROM sqlite_master ORDER BY type, name")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<rusqlite::Result<_>>()?;
    for (kind, name, text) in &objects {
        put(&mut h, b'o', kind.as_bytes());
        put(&mut h, b'n', name.as_bytes());
        put(&mut h, b's', text.as_deref().unwrap_or("").as_bytes());
    }
    for (kind, name, text) in &objects {
        let virtual_table = text.as_deref().is_some_and(|s| {
            s.trim_start()
                .to_ascii_uppercase()
                .starts_with("CREATE VIRTUAL")
        });
        if kind != "table" || virtual_table {
            continue; // a virtual table's rows live in its shadow tables
        }
        let mut st = conn.prepare(&format!("SELECT * FROM \"{}\"", name.replace('"', "\"\"")))?;
        let n = st.column_count();
        let mut rows = st.query([])?;
        while let Some(r) = rows.next()? {
            h.update(b"r");
            for i in 0..n {
                match r.get_ref(i)? {
                    ValueRef::Null => put(&mut h, 0, &[]),
                    ValueRef::Integer(v) => put(&mut h, 1, &v.to_be_bytes()),
                    ValueRef::Real(v) => put(&mut h, 2, &v.to_bits().to_be_bytes()),
                    ValueRef::Text(t) => put(&mut h, 3, t),
                    ValueRef::Blob(b) => put(&mut h, 4, b),
                }
            }
        }
    }
    Ok(hex::encode(h.finalize()))
}

pub(super) fn sidecar(db: &Path, suffix: &str) -> PathBuf {
    let mut s = db.as_os_str().to_os_string();
    s.push(suffix);
    PathBuf::from(s)
}

pub(super) fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).map_err(io(path.display().to_string()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io(path.display().to_string()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Range reads into `to`, hashing as it goes; returns the SHA-256.
pub(super) async fn download(
    store: &dyn ObjectStore,
    key: &str,
    size: u64,
    to: &Path,
    progress: bool,
) -> Result<String> {
    let mut f = File::create(to).map_err(io(to.display().to_string()))?;
    let mut h = Sha256::new();
    let bar = crate::progress::Progress::new(progress, size, "download");
    let mut at = 0u64;
    while at < size {
        let chunk = store.get_range(key, at, CHUNK.min(size - at)).await?;
        if chunk.is_empty() {
            break;
        }
        h.update(&chunk);
        f.write_all(&chunk).map_err(io(to.display().to_string()))?;
        at += chunk.len() as u64;
        bar.inc(chunk.len() as u64);
    }
    bar.finish();
    f.sync_all().map_err(io(to.display().to_string()))?;
    if at != size {
        return Err(MigrateError::Other(format!(
            "{key}: got {at} of {size} bytes (the object changed while it was read? try again)"
        )));
    }
    Ok(hex::encode(h.finalize()))
}

/// The snapshot object, streamed page by page from the image to the file
/// `out` (memory does not grow with the database); returns its length.
pub(super) fn encode(image: &Path, meta: SnapshotMeta, out: &Path, progress: bool) -> Result<u64> {
    let what = || image.display().to_string();
    let ps = meta.page_size as usize;
    let total = meta.page_count as u64 * ps as u64;
    let dst = File::create(out).map_err(io(out.display().to_string()))?;
    let dst = std::io::BufWriter::with_capacity(1 << 20, dst);
    let mut w = SnapshotWriter::new(dst, meta)
        .map_err(|e| MigrateError::Other(format!("snapshot: {e}")))?;
    let mut f = std::io::BufReader::new(File::open(image).map_err(io(what()))?);
    let bar = crate::progress::Progress::new(progress, total, "snapshot");
    let mut page = vec![0u8; ps];
    for _ in 0..total / ps as u64 {
        f.read_exact(&mut page).map_err(io(what()))?;
        w.write_page(&page)
            .map_err(|e| MigrateError::Other(format!("snapshot: {e}")))?;
        bar.inc(ps as u64);
    }
    bar.finish();
    let dst = w
        .finish()
        .map_err(|e| MigrateError::Other(format!("snapshot: {e}")))?;
    let f = dst
        .into_inner()
        .map_err(|e| io(out.display().to_string())(e.into_error()))?;
    f.metadata()
        .map(|m| m.len())
        .map_err(io(out.display().to_string()))
}

pub(super) fn spinner(enabled: bool, msg: String) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !enabled || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new_spinner().with_message(msg);
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    bar
}

/// `VACUUM INTO dest`: a consistent copy of the local database (its WAL
/// included), whatever state the file is in.
pub(super) fn backup(local: &Path, dest: &Path) -> Result<()> {
    if let Some(d) = dest.parent() {
        std::fs::create_dir_all(d).map_err(io(d.display().to_string()))?;
    }
    let what = format!("backing up {} to {}", local.display(), dest.display());
    let conn = rusqlite::Connection::open(local).map_err(sql(what.clone()))?;
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .map_err(sql(what.clone()))?;
    let target = dest
        .to_str()
        .ok_or_else(|| MigrateError::Other(format!("{}: not a UTF-8 path", dest.display())))?;
    conn.execute("VACUUM INTO ?1", [target])
        .map_err(sql(what))?;
    Ok(())
}

pub(super) fn copy_atomic(from: &Path, to: &Path) -> Result<()> {
    let tmp = to.with_extension("tmp");
    std::fs::copy(from, &tmp).map_err(io(tmp.display().to_string()))?;
    File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io(tmp.display().to_string()))?;
    std::fs::rename(&tmp, to).map_err(io(to.display().to_string()))
}

/// Replace `local` by `image`: written beside it, then the old file's -wal,
/// -shm and -journal removed (they belong to the old content, which the
/// backup holds) and the new file renamed over it, keeping its owner and mode.
pub(super) fn install(image: &Path, local: &Path) -> Result<()> {
    let dir = local.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".{DB}.membridge-migrate"));
    let old = std::fs::metadata(local).ok();
    copy_atomic(image, &tmp)?;
    if let Some(m) = &old {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(m.mode() & 0o7777));
        let _ = std::os::unix::fs::chown(&tmp, Some(m.uid()), Some(m.gid()));
    }
    for s in ["-wal", "-shm", "-journal"] {
        match std::fs::remove_file(sidecar(local, s)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(sidecar(local, s).display().to_string())(e)),
        }
    }
    std::fs::rename(&tmp, local).map_err(io(local.display().to_string()))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir.display().to_string()))
}

/// Processes (other than this one) holding `db` or its sidecars open:
/// "pid 123 (worker-service)".
pub(super) fn open_by(db: &Path) -> Vec<String> {
    let Ok(db) = db.canonicalize() else {
        return Vec::new();
    };
    let names: Vec<PathBuf> = ["", "-wal", "-shm", "-journal"]
        .iter()
        .map(|s| sidecar(&db, s))
        .collect();
    let me = std::process::id().to_string();
    let mut found = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return found;
    };
    for p in procs.flatten() {
        let pid = p.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) || pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        if fds
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| names.contains(&t)))
        {
            let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
            found.push(format!("pid {pid} ({})", comm.trim()));
        }
    }
    found
}

/// Where the download goes: under the state directory, or for a dry run a
/// private temporary directory that is removed again.
pub(super) struct WorkDir {
    pub(super) path: PathBuf,
}

impl WorkDir {
    pub(super) fn new(cfg: &Config, dry_run: bool) -> Result<WorkDir> {
        let path = if dry_run {
            std::env::temp_dir().join(format!(
                "membridge-migrate-{}-{:08x}",
                std::process::id(),
                rand::random::<u32>()
            ))
        } else {
            cfg.state_dir.join("migrate")
        };
        std::fs::create_dir_all(&path).map_err(io(path.display().to_string()))?;
        Ok(WorkDir { path })
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
