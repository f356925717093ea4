//! Replicated files (`MEMBRIDGE_REPLICATE_FILES`): small files kept as whole
//! versions. claude-mem keeps its one-time migration markers as files beside
//! the database; they say what was done *to the database*, so every machine
//! must see the same ones, or each re-runs the migration (and its full copy of
//! the database) at every worker start.
//!
//! - **Primary.** When a replicated file is closed after a write, fsynced,
//!   renamed onto or unlinked, capture records its content ([`Recorder`]); the
//!   uploader puts each version create-only at `files/<name>/<sha256>` and
//!   names it in the manifest's `files` map by the same compare-and-swap as
//!   everything else, after the databases of the same round, so a marker never
//!   reaches a secondary before the database state it describes. Files over
//!   [`MAX_BYTES`] are not replicated (logged).
//! - **Secondary.** Each time the manifest moves, the follower makes every
//!   file it lists hold the listed version ([`follow`]): fetched, verified
//!   against its SHA-256, written beside it and renamed over it in the backing
//!   dir, the kernel's cached entry dropped; a deleted entry removes the local
//!   file. Files the manifest does not list are left alone. Clients' writes to
//!   replicated files stay refused, as for the database.
//! - **Promotion.** Before its first publication a new primary reconciles
//!   ([`reconcile`]): the bucket's version wins for every name it lists
//!   (unless a client wrote it here since the promotion), and replicated files
//!   only this node has (markers written before membridge was installed) are
//!   published. Versions recorded but not yet published when the node stops
//!   being primary (a crash, a lost lease) are not kept: the bucket's win.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::follower::Follower;
use super::manifest::{FileEntry, Manifest};
use super::node::Role;
use crate::fs::class::{Classifier, PathClass};
use crate::fs::Invalidator;
use crate::remote::{Layout, ObjectStore, StoreError};

/// Larger files are not replicated: these are markers and small settings, and
/// a version travels whole in one object and one manifest advance.
pub const MAX_BYTES: u64 = 1 << 20;

/// One recorded state of a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Version {
    Content(Bytes),
    Deleted,
}

#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("replicated file {name}: {source}")]
    Io {
        name: String,
        source: std::io::Error,
    },
    #[error("replicated file {name}: {why}")]
    Corrupt { name: String, why: String },
}

impl FilesError {
    pub fn is_unreachable(&self) -> bool {
        matches!(self, FilesError::Store(e) if e.is_transient())
    }
}

pub fn sha256_hex(body: &[u8]) -> String {
    hex::encode(Sha256::digest(body))
}

/// Which paths are replicated files on this node, and the versions capture
/// recorded while primary that the uploader has not published yet.
#[derive(Default)]
pub struct Recorder {
    classes: OnceLock<(Classifier, Vec<String>)>,
    pending: Mutex<BTreeMap<String, Version>>,
}

impl Recorder {
    /// The node's globs (config); without them no file is replicated.
    pub fn configure(&self, databases: &[String], files: &[String]) {
        let _ = self
            .classes
            .set((Classifier::new(databases, files), files.to_vec()));
    }

    /// `name` (relative to the mount) is a replicated file on this node. A
    /// name from the bucket that this node's config keeps local, or that could
    /// leave the backing dir, is not.
    pub fn replicated(&self, name: &str) -> bool {
        let safe = !name.is_empty()
            && !name.starts_with('/')
            && name
                .split('/')
                .all(|c| !c.is_empty() && c != "." && c != "..");
        safe && self
            .classes
            .get()
            .is_some_and(|(c, _)| matches!(c.classify(Path::new(name)), PathClass::File(_)))
    }

    /// Record what `name` holds now under `backing`; `false` when it cannot be
    /// replicated (too large, not a regular file: logged).
    pub fn record(&self, backing: &Path, name: &str) -> bool {
        let version = match read_local(backing, name) {
            Ok(Some(body)) => Version::Content(body),
            Ok(None) => Version::Deleted,
            Err(e) => {
                tracing::warn!(file = name, error = %e, "not replicating this version of the file");
                return false;
            }
        };
        self.pending
            .lock()
            .unwrap()
            .insert(name.to_string(), version);
        true
    }

    pub fn take(&self) -> BTreeMap<String, Version> {
        std::mem::take(&mut *self.pending.lock().unwrap())
    }

    /// Versions that could not be published go back, unless newer ones were
    /// recorded meanwhile.
    pub fn put_back(&self, versions: BTreeMap<String, Version>) {
        let mut p = self.pending.lock().unwrap();
        for (name, v) in versions {
            p.entry(name).or_insert(v);
        }
    }

    /// Versions recorded and not published yet.
    pub fn pending(&self) -> u64 {
        self.pending.lock().unwrap().len() as u64
    }

    pub fn is_pending(&self, name: &str) -> bool {
        self.pending.lock().unwrap().contains_key(name)
    }

    /// Replicated files present under `backing` (regular files only).
    pub fn local(&self, backing: &Path) -> Vec<String> {
        let Some((_, globs)) = self.classes.get() else {
            return Vec::new();
        };
        let root = format!("{}/", backing.display());
        let mut names: Vec<String> = globs
            .iter()
            .filter_map(|g| glob::glob(&format!("{root}{g}")).ok())
            .flatten()
            .flatten()
            .filter(|p| std::fs::symlink_metadata(p).is_ok_and(|m| m.is_file()))
            .filter_map(|p| p.to_str()?.strip_prefix(&root).map(String::from))
            .filter(|n| self.replicated(n))
            .collect();
        names.sort();
        names.dedup();
        names
    }
}

/// The content of `name` under `backing`; `None` if there is no such file.
pub fn read_local(backing: &Path, name: &str) -> std::io::Result<Option<Bytes>> {
    let path = backing.join(name);
    let meta = match std::fs::symlink_metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    if !meta.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    if meta.len() > MAX_BYTES {
        return Err(std::io::Error::other(format!(
            "{} bytes, over the {MAX_BYTES}-byte limit of replicated files",
            meta.len()
        )));
    }
    match std::fs::read(&path) {
        Ok(b) if b.len() as u64 > MAX_BYTES => Err(std::io::Error::other("grew over the limit")),
        Ok(b) => Ok(Some(Bytes::from(b))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The manifest entries that publishing `pending` changes, with the bodies
/// to upload first (`None`: a deletion). Versions the manifest already has
/// (a file closed again unchanged) and deletions of files it never had are
/// left out.
pub fn changes(
    layout: &Layout,
    m: &Manifest,
    pending: &BTreeMap<String, Version>,
) -> Vec<(String, Option<(FileEntry, Bytes)>)> {
    let mut out = Vec::new();
    for (name, v) in pending {
        let current = m.files.get(name);
        match v {
            Version::Content(body) => {
                let sha = sha256_hex(body);
                if current.is_some_and(|e| !e.deleted && e.sha256 == sha) {
                    continue;
                }
                let entry = FileEntry {
                    key: layout.file_version(name, &sha),
                    sha256: sha,
                    size: body.len() as u64,
                    deleted: false,
                };
                out.push((name.clone(), Some((entry, body.clone()))));
            }
            Version::Deleted => {
                if current.is_some_and(|e| !e.deleted) {
                    out.push((name.clone(), None));
                }
            }
        }
    }
    out
}

/// Apply [`changes`] to a manifest being advanced.
pub fn apply(m: &mut Manifest, changes: &[(String, Option<(FileEntry, Bytes)>)]) {
    for (name, c) in changes {
        match c {
            Some((e, _)) => {
                m.files.insert(name.clone(), e.clone());
            }
            None => {
                if let Some(e) = m.files.get_mut(name) {
                    e.deleted = true;
                }
            }
        }
    }
}

/// Serializes the follower's and the promotion's writes into the backing dir:
/// a follower round still in flight when the node is promoted must not land
/// an older version after the promotion's reconcile.
fn lock() -> &'static tokio::sync::Mutex<()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    &LOCK
}

/// The follower's part, called from its tick once the databases are applied:
/// make every replicated file the manifest lists what it says. An error
/// (said in a line) makes the follower poll the manifest again.
pub async fn follow(f: &Follower, m: &Manifest) -> Result<(), FilesError> {
    if m.files.is_empty() {
        return Ok(());
    }
    let _g = lock().lock().await;
    if !matches!(f.node.role(), Role::Secondary | Role::CatchingUp) {
        return Ok(()); // promoted meanwhile: the reconcile decides now
    }
    let recorder = f.node.capture().files();
    for (name, e) in &m.files {
        if recorder.replicated(name) {
            make_local(f.store.as_ref(), &f.backing, name, e, Some(&f.invalidator)).await?;
        }
    }
    Ok(())
}

/// A new primary, before its first publication: the bucket's versions of
/// the names it lists (unless a client wrote them here since), then files
/// only this node has are recorded for publication. Returns how many local
/// files changed.
pub async fn reconcile(
    store: &dyn ObjectStore,
    m: &Manifest,
    backing: &Path,
    recorder: &Recorder,
    inval: Option<&Arc<Invalidator>>,
) -> Result<usize, FilesError> {
    let _g = lock().lock().await;
    let mut changed = 0;
    for (name, e) in &m.files {
        if recorder.replicated(name) && !recorder.is_pending(name) {
            changed += usize::from(make_local(store, backing, name, e, inval).await?);
        }
    }
    for name in recorder.local(backing) {
        if !m.files.contains_key(&name) && !recorder.is_pending(&name) {
            tracing::info!(file = %name, "replicated file only on this node: publishing it");
            recorder.record(backing, &name);
        }
    }
    Ok(changed)
}

/// Make `name` under `backing` hold the version `e` names; `true` if that
/// changed the local file.
async fn make_local(
    store: &dyn ObjectStore,
    backing: &Path,
    name: &str,
    e: &FileEntry,
    inval: Option<&Arc<Invalidator>>,
) -> Result<bool, FilesError> {
    let io = |source| FilesError::Io {
        name: name.to_string(),
        source,
    };
    let have = read_local(backing, name)
        .map_err(io)?
        .map(|b| sha256_hex(&b));
    let want = (!e.deleted).then_some(&e.sha256);
    if have.as_ref() == want {
        return Ok(false);
    }
    let body = match want {
        None => None,
        Some(sha) => {
            let body = store.get(&e.key).await?.body;
            if sha256_hex(&body) != *sha || body.len() as u64 != e.size {
                return Err(FilesError::Corrupt {
                    name: name.to_string(),
                    why: format!("{} does not hold the version the manifest names", e.key),
                });
            }
            Some(body)
        }
    };
    let (dir, n, inval) = (backing.to_path_buf(), name.to_string(), inval.cloned());
    let deleted = body.is_none();
    tokio::task::spawn_blocking(move || match body {
        Some(b) => install(&dir, &n, &b, inval.as_deref()),
        None => remove(&dir, &n, inval.as_deref()),
    })
    .await
    .map_err(|e| io(std::io::Error::other(e.to_string())))?
    .map_err(io)?;
    tracing::info!(file = name, sha256 = %e.sha256, deleted, "replicated file updated from the bucket");
    Ok(true)
}

/// Write `body` as `name` under `backing` atomically: a temporary file beside
/// it, renamed over it. The owner and mode of the file it replaces are kept
/// (a new file gets its directory's owner and 0644).
fn install(
    backing: &Path,
    name: &str,
    body: &[u8],
    inval: Option<&Invalidator>,
) -> std::io::Result<()> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let path = backing.join(name);
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    std::fs::create_dir_all(&dir)?;
    let base = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp: PathBuf = dir.join(format!(
        ".{base}.membridge-{}-{}.tmp",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let (uid, gid, mode) = match std::fs::metadata(&path) {
        Ok(m) => (m.uid(), m.gid(), m.mode() & 0o7777),
        Err(_) => {
            let d = std::fs::metadata(&dir)?;
            (d.uid(), d.gid(), 0o644)
        }
    };
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        std::io::Write::write_all(&mut f, body)?;
        // Not root: the file stays ours, which is the same user.
        let _ = std::os::unix::fs::fchown(&f, Some(uid), Some(gid));
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    if let Some(i) = inval {
        // The name now leads to another inode (or, cached as absent, to one).
        i.invalidate_entry(name);
    }
    Ok(())
}

fn remove(backing: &Path, name: &str, inval: Option<&Invalidator>) -> std::io::Result<()> {
    match std::fs::remove_file(backing.join(name)) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    if let Some(i) = inval {
        i.invalidate_entry(name);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recorder(files: &[&str]) -> Recorder {
        let r = Recorder::default();
        let files: Vec<String> = files.iter().map(|s| s.to_string()).collect();
        r.configure(&["claude-mem.db".into()], &files);
        r
    }

    #[test]
    fn only_this_nodes_replicated_files_and_only_inside_the_dir() {
        let r = recorder(&[".cwd-remap-applied-v1", "modes/*.json", "*"]);
        assert!(r.replicated(".cwd-remap-applied-v1"));
        assert!(r.replicated("modes/a.json"));
        assert!(!r.replicated("claude-mem.db"), "a database is not a file");
        assert!(!r.replicated("claude-mem.db-wal"));
        for bad in ["../x", "modes/../../x", "/etc/passwd", "", "modes//a.json"] {
            assert!(!r.replicated(bad), "{bad}");
        }
        assert!(!Recorder::default().replicated("x"), "unconfigured: none");
    }

    #[test]
    fn record_changes_and_apply() {
        let dir = tempfile::tempdir().unwrap();
        let r = recorder(&["m1", "m2", "big"]);
        std::fs::write(dir.path().join("m1"), b"one").unwrap();
        std::fs::write(dir.path().join("big"), vec![0u8; MAX_BYTES as usize + 1]).unwrap();
        assert!(r.record(dir.path(), "m1"));
        assert!(r.record(dir.path(), "m2"), "absent: a deletion");
        assert!(!r.record(dir.path(), "big"));
        assert_eq!(r.local(dir.path()), vec!["big", "m1"]);
        let layout = Layout::new("cid");
        let mut m = Manifest::new("cid", "a", 1);
        let pending = r.take();
        assert!(!r.is_pending("m1"));
        let c = changes(&layout, &m, &pending);
        // m2 was never published: its deletion changes nothing.
        assert_eq!(c.len(), 1);
        apply(&mut m, &c);
        let e = &m.files["m1"];
        assert_eq!((e.size, e.deleted), (3, false));
        assert_eq!(e.sha256, sha256_hex(b"one"));
        assert_eq!(e.key, layout.file_version("m1", &e.sha256));
        // Closed again unchanged: nothing to publish.
        assert!(changes(&layout, &m, &pending).is_empty());
        std::fs::remove_file(dir.path().join("m1")).unwrap();
        r.record(dir.path(), "m1");
        let c = changes(&layout, &m, &r.take());
        apply(&mut m, &c);
        assert!(m.files["m1"].deleted);
        assert_eq!(m.files["m1"].sha256, sha256_hex(b"one"));
    }

    #[test]
    fn install_replaces_atomically_keeping_mode_and_remove_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/m");
        install(dir.path(), "sub/m", b"v1", None).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"v1");
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, 0o644);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        install(dir.path(), "sub/m", b"v2", None).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"v2");
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        let left: Vec<_> = std::fs::read_dir(dir.path().join("sub")).unwrap().collect();
        assert_eq!(left.len(), 1, "no temporary file left behind");
        remove(dir.path(), "sub/m", None).unwrap();
        remove(dir.path(), "sub/m", None).unwrap();
        assert!(!p.exists());
    }
}
