//! Databases this node set aside, until their rows are merged back or the
//! user dismisses them: no history disappears from claude-mem silently.
//!
//! Two places set a database aside, both under the state dir:
//! - `replaced/<db>-<utc>`: the local file a secondary's follower replaced
//!   with the bucket's copy (a joining machine's own history, a restarted
//!   node's stale or divergent file), with its `-wal` beside it;
//! - `divergent/<db>-epoch<N>-<utc>.db` with its `.json` report: the tail a
//!   deposed primary acknowledged that the bucket's history never got
//!   ([`super::divergent`]).
//!
//! Each stays **outstanding** (a WARN when it is made; listed in
//! `status.json`, `membridge status` and `doctor`, which says DEGRADED)
//! until a sidecar `<copy>.resolved` says how it was resolved: `merged`
//! (`membridge merge`), `dismissed` (`membridge merge --dismiss`), or
//! `contained` (the daemon's [`Checker`] found every row of the copy in the
//! replicated database already: a copy of a secondary that was merely
//! behind, or a tail merged from another node). The checker's last count is
//! kept in `<copy>.check`. The files on disk are the state: the daemon,
//! `merge` and `doctor` all read them from there.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::divergent;
use crate::status::{Status, StatusDoc};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A local database the bucket's copy replaced (`replaced/`).
    Replaced,
    /// A deposed primary's unpublished tail (`divergent/`).
    Divergent,
}

/// How a set-aside copy was resolved (`<copy>.resolved`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resolution {
    /// "merged", "dismissed" or "contained".
    pub how: String,
    pub at: String,
    #[serde(default)]
    pub detail: String,
}

/// The daemon's last comparison of a copy with the replicated database
/// (`<copy>.check`): what `membridge merge --dry-run` would say.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    pub at: String,
    pub new_rows: u64,
    pub present: u64,
    pub conflicting: u64,
    /// Why the copy could not be compared (not a claude-mem database...).
    #[serde(default)]
    pub error: Option<String>,
}

/// One set-aside database.
#[derive(Debug, Clone)]
pub struct Entry {
    pub kind: Kind,
    /// The replicated database it was a copy of (`claude-mem.db`).
    pub db: String,
    /// The database file to merge (a divergent report may have none).
    pub copy: Option<PathBuf>,
    pub report: Option<PathBuf>,
    pub resolution: Option<Resolution>,
    pub check: Option<Check>,
}

impl Entry {
    /// The path that names it: the copy, else the report.
    pub fn key(&self) -> &Path {
        self.copy
            .as_deref()
            .or(self.report.as_deref())
            .expect("an entry has a copy or a report")
    }

    pub fn outstanding(&self) -> bool {
        self.resolution.is_none()
    }

    /// What brings its rows back, or acknowledges it.
    pub fn commands(&self) -> String {
        let key = self.key().display();
        match &self.copy {
            Some(_) => format!(
                "`membridge merge {key}` on the primary brings its rows back; \
                 `membridge merge --dismiss {key}` acknowledges it without importing"
            ),
            None => format!("`membridge merge --dismiss {key}` acknowledges it"),
        }
    }

    /// One line for `status` and `doctor`.
    pub fn describe(&self) -> String {
        let what = match self.kind {
            Kind::Replaced => format!(
                "this node's {} before the bucket's copy replaced it",
                self.db
            ),
            Kind::Divergent => format!(
                "transactions of {} acknowledged on this node that the bucket's history does not \
                 have (another node took over first){}",
                self.db,
                self.report
                    .as_ref()
                    .map(|r| format!(", report {}", r.display()))
                    .unwrap_or_default()
            ),
        };
        let check = match &self.check {
            Some(Check { error: Some(e), .. }) => format!("; cannot be compared: {e}"),
            Some(c) => format!(
                "; {} row(s) the replicated database lacks, {} conflicting (checked {})",
                c.new_rows, c.conflicting, c.at
            ),
            None => String::new(),
        };
        format!("{}: {what}{check}", self.key().display())
    }
}

fn sidecar(key: &Path, ext: &str) -> PathBuf {
    let mut p = key.as_os_str().to_os_string();
    p.push(ext);
    PathBuf::from(p)
}

fn read_json<T: serde::de::DeserializeOwned>(p: &Path) -> Option<T> {
    serde_json::from_slice(&std::fs::read(p).ok()?).ok()
}

/// Writes `value` next to `key` atomically (a reader never sees half).
fn write_json<T: Serialize>(key: &Path, ext: &str, value: &T) -> std::io::Result<()> {
    let path = sidecar(key, ext);
    let tmp = sidecar(key, &format!("{ext}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec_pretty(value).expect("serializes"))?;
    std::fs::rename(&tmp, &path)
}

fn entry(kind: Kind, db: String, copy: Option<PathBuf>, report: Option<PathBuf>) -> Entry {
    let mut e = Entry {
        kind,
        db,
        copy,
        report,
        resolution: None,
        check: None,
    };
    e.resolution = read_json(&sidecar(e.key(), ".resolved"));
    e.check = read_json(&sidecar(e.key(), ".check"));
    e
}

/// `<state dir>/replaced`.
pub fn replaced_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("replaced")
}

/// Names in `replaced/` that are not copies of a database themselves.
const NOT_COPIES: &[&str] = &["-wal", "-shm", "-journal", ".resolved", ".check", ".tmp"];

/// Every set-aside database under `state_dir`, resolved or not, oldest first
/// within each kind.
pub fn scan(state_dir: &Path) -> Vec<Entry> {
    let mut out = Vec::new();
    for report in divergent::reports(state_dir) {
        let r: Option<divergent::Report> = read_json(&report);
        let (db, copy) = match r {
            Some(r) => (r.database, r.copy.map(PathBuf::from)),
            None => (String::new(), None),
        };
        out.push(entry(Kind::Divergent, db, copy, Some(report)));
    }
    let mut copies: Vec<PathBuf> = std::fs::read_dir(replaced_dir(state_dir))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            !NOT_COPIES.iter().any(|s| name.ends_with(s))
        })
        .collect();
    copies.sort();
    for copy in copies {
        let name = copy.file_name().unwrap_or_default().to_string_lossy();
        // `<db with / as %2F>-<%Y%m%dT%H%M%SZ>`, as the follower names them.
        let db = name
            .rsplit_once('-')
            .map_or(name.as_ref(), |(db, _)| db)
            .replace("%2F", "/");
        out.push(entry(Kind::Replaced, db, Some(copy), None));
    }
    out
}

/// The set-aside database `file` names (its copy, or a divergent report),
/// under any membridge state dir on this machine.
pub fn locate(file: &Path) -> Option<Entry> {
    let file = file.canonicalize().ok()?;
    let state_dir = file.parent()?.parent()?;
    if !state_dir.join("journal.db").exists() {
        return None;
    }
    scan(state_dir).into_iter().find(|e| {
        [e.copy.as_deref(), e.report.as_deref()]
            .into_iter()
            .flatten()
            .any(|p| p.canonicalize().is_ok_and(|p| p == file))
    })
}

/// Marks `e` resolved: `how` is "merged", "dismissed" or "contained".
pub fn resolve(e: &Entry, how: &str, detail: impl Into<String>) -> std::io::Result<()> {
    write_json(
        e.key(),
        ".resolved",
        &Resolution {
            how: how.into(),
            at: chrono::Utc::now().to_rfc3339(),
            detail: detail.into(),
        },
    )
}

/// The follower kept `src` aside as `dst` before replacing it with the
/// bucket's copy. A database (not its `-wal`) is history that claude-mem no
/// longer shows: say so loudly, with the way back.
pub fn kept(src: &Path, dst: &Path) {
    let name = dst.file_name().unwrap_or_default().to_string_lossy();
    if NOT_COPIES.iter().any(|s| name.ends_with(s)) {
        tracing::info!(from = %src.display(), to = %dst.display(), "kept the local copy's WAL aside");
        return;
    }
    tracing::warn!(
        from = %src.display(),
        to = %dst.display(),
        "this node's own database was set aside and the bucket's copy replaces it: rows only it \
         has are no longer in claude-mem; `membridge merge {}` on the primary brings them back, \
         `membridge merge --dismiss {}` acknowledges it (the daemon checks it and clears it by \
         itself if the bucket's copy already has every row)",
        dst.display(),
        dst.display()
    );
}

/// Lists the outstanding ones in the status document.
pub fn publish(entries: &[Entry], doc: &mut StatusDoc) {
    let outstanding = |k: Kind| {
        entries
            .iter()
            .filter(move |e| e.kind == k && e.outstanding())
            .map(|e| e.key().display().to_string())
    };
    doc.divergent = entries
        .iter()
        .filter(|e| e.kind == Kind::Divergent && e.outstanding())
        .filter_map(|e| e.report.as_ref().map(|r| r.display().to_string()))
        .collect();
    doc.replaced = outstanding(Kind::Replaced).collect();
}

/// Compares a copy with the replicated database at `target` (read-only).
pub fn check(copy: &Path, target: &Path) -> Check {
    let opts = crate::merge::Options {
        dry_run: true,
        ..Default::default()
    };
    let at = chrono::Utc::now().to_rfc3339();
    match crate::merge::merge(copy, target, &opts, &mut || Ok(())) {
        Ok(r) => Check {
            at,
            new_rows: r.new_rows(),
            present: r.present(),
            conflicting: r.conflicting(),
            error: None,
        },
        Err(e) => Check {
            at,
            new_rows: 0,
            present: 0,
            conflicting: 0,
            error: Some(e.to_string()),
        },
    }
}

/// Copies are compared again at most this often...
const RECHECK_MIN: Duration = Duration::from_secs(10);
/// ...and no more than 1% of the time.
const RECHECK_FACTOR: u32 = 100;
/// How often the set-aside files are looked at.
const SCAN_EVERY: Duration = Duration::from_secs(2);

/// The daemon's watcher of set-aside copies: keeps their list in the status
/// document, and compares each outstanding copy with the replicated database
/// (through the mount, read-only, once the view is at the head): at start,
/// when it appears, and again when the database or the set of resolved
/// copies changed (bounded by [`RECHECK_MIN`] and [`RECHECK_FACTOR`]). A copy
/// with nothing the database lacks is resolved as `contained`.
pub struct Checker {
    state_dir: PathBuf,
    mount_dir: PathBuf,
    status: Status,
    /// Where a database's view stands (see [`ViewAt`]).
    view_at: ViewAt,
    /// The mount serves (copies are compared through it).
    ready: AtomicBool,
    paused_until: Mutex<Option<Instant>>,
    stop: AtomicBool,
}

/// What a copy was last compared against.
struct Last {
    at: Instant,
    took: Duration,
    view: String,
    resolved: usize,
}

/// A token naming where a replicated database's view stands, that changes
/// when it moves; `None` while it is not at a head worth comparing a copy
/// against. The daemon answers it from the node's own state
/// (`Node::view_at_head`), never from `status.json`.
pub type ViewAt = Box<dyn Fn(&str) -> Option<String> + Send + Sync>;

impl Checker {
    /// `status` is only written (the list of copies); decisions come from
    /// `view_at`.
    pub fn start(
        state_dir: &Path,
        mount_dir: &Path,
        status: &Status,
        view_at: ViewAt,
    ) -> Arc<Checker> {
        let c = Arc::new(Checker {
            state_dir: state_dir.to_path_buf(),
            mount_dir: mount_dir.to_path_buf(),
            status: status.clone(),
            view_at,
            ready: AtomicBool::new(false),
            paused_until: Mutex::new(None),
            stop: AtomicBool::new(false),
        });
        let run = c.clone();
        let spawned = std::thread::Builder::new()
            .name("set-aside".into())
            .spawn(move || run.run());
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot watch set-aside copies");
        }
        c
    }

    /// No connection on the mount for a while (an unmount is coming).
    pub fn pause(&self, d: Duration) {
        *self.paused_until.lock().unwrap() = Some(Instant::now() + d);
    }

    /// The mount serves: copies may be compared through it from now on.
    pub fn mounted(&self) {
        self.ready.store(true, Ordering::Release);
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
    }

    fn paused(&self) -> bool {
        self.stop.load(Ordering::Acquire)
            || self
                .paused_until
                .lock()
                .unwrap()
                .is_some_and(|t| Instant::now() < t)
    }

    fn run(&self) {
        let mut last: HashMap<PathBuf, Last> = HashMap::new();
        while !self.stop.load(Ordering::Acquire) {
            let entries = scan(&self.state_dir);
            self.status.update(|s| publish(&entries, s));
            let resolved = entries.iter().filter(|e| !e.outstanding()).count();
            for e in entries.iter().filter(|e| e.outstanding()) {
                let Some(copy) = &e.copy else { continue };
                if self.paused() {
                    break;
                }
                if !self.ready.load(Ordering::Acquire) {
                    break;
                }
                let Some(view) = (self.view_at)(&e.db) else {
                    continue;
                };
                let due = last.get(copy).is_none_or(|l| {
                    (l.view != view || l.resolved != resolved)
                        && l.at.elapsed() >= RECHECK_MIN.max(l.took * RECHECK_FACTOR)
                });
                if !due {
                    continue;
                }
                let t = Instant::now();
                let c = check(copy, &self.mount_dir.join(&e.db));
                let took = t.elapsed();
                self.record(e, &c, !last.contains_key(copy));
                last.insert(
                    copy.clone(),
                    Last {
                        at: Instant::now(),
                        took,
                        view,
                        resolved,
                    },
                );
            }
            let t = Instant::now();
            while t.elapsed() < SCAN_EVERY && !self.stop.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    fn record(&self, e: &Entry, c: &Check, first: bool) {
        let copy = e.key();
        if let Err(err) = write_json(copy, ".check", c) {
            tracing::warn!(copy = %copy.display(), error = %err, "cannot record the set-aside copy's check");
        }
        match (&c.error, c.new_rows) {
            (None, 0) => {
                let detail = format!(
                    "every row is in the replicated database ({} present, {} conflicting: kept as the replicated database has them)",
                    c.present, c.conflicting
                );
                match resolve(e, "contained", detail) {
                    Ok(()) => tracing::info!(
                        copy = %copy.display(),
                        present = c.present,
                        conflicting = c.conflicting,
                        "set-aside copy has nothing the replicated database lacks: nothing to merge"
                    ),
                    Err(err) => {
                        tracing::warn!(copy = %copy.display(), error = %err, "cannot mark the set-aside copy")
                    }
                }
            }
            (Some(why), _) if first => tracing::warn!(
                copy = %copy.display(),
                "set-aside copy cannot be compared with the replicated database ({why}); review it, \
                 then `membridge merge --dismiss {}`",
                copy.display()
            ),
            (None, n) if first => tracing::warn!(
                copy = %copy.display(),
                new_rows = n,
                conflicting = c.conflicting,
                "set-aside copy has rows the replicated database lacks: {}",
                e.commands()
            ),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_resolve_and_locate() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path();
        std::fs::write(state.join("journal.db"), b"").unwrap();
        let replaced = replaced_dir(state);
        std::fs::create_dir_all(&replaced).unwrap();
        let copy = replaced.join("claude-mem.db-20261203T104213Z");
        std::fs::write(&copy, b"db").unwrap();
        for side in ["-wal", "-shm"] {
            std::fs::write(sidecar(&copy, side), b"x").unwrap();
        }
        let ddir = divergent::dir(state);
        std::fs::create_dir_all(&ddir).unwrap();
        let dcopy = ddir.join("claude-mem.db-epoch1-x.db");
        std::fs::write(&dcopy, b"db").unwrap();
        let report = serde_json::json!({
            "database": "claude-mem.db", "node": "a", "epoch": 1, "bucket_epoch": 2,
            "reason": "r", "published_txid": 1, "local_head_txid": 3,
            "unpublished_txids": [2, 3], "unpublished_count": 2,
            "first_commit_at": null, "last_commit_at": null, "local_checksum": "00",
            "copy": dcopy.display().to_string(), "copy_error": null, "created_at": "t"
        });
        let rpath = ddir.join("claude-mem.db-epoch1-x.json");
        std::fs::write(&rpath, report.to_string()).unwrap();

        let all = scan(state);
        assert_eq!(all.len(), 2, "{all:?}");
        assert_eq!(all[0].kind, Kind::Divergent);
        assert_eq!(all[0].copy.as_deref(), Some(dcopy.as_path()));
        assert_eq!(all[1].kind, Kind::Replaced);
        assert_eq!(all[1].db, "claude-mem.db");
        let mut doc = Status::for_tests("n").snapshot();
        publish(&all, &mut doc);
        assert_eq!(doc.divergent, [rpath.display().to_string()]);
        assert_eq!(doc.replaced, [copy.display().to_string()]);

        // The report names the same entry as its copy.
        assert_eq!(locate(&rpath).unwrap().key(), dcopy);
        let e = locate(&copy).unwrap();
        resolve(&e, "dismissed", "").unwrap();
        assert!(locate(&sidecar(&copy, "-wal")).is_none());
        let all = scan(state);
        assert_eq!(all.len(), 2, "a sidecar is not a copy: {all:?}");
        assert_eq!(all[1].resolution.as_ref().unwrap().how, "dismissed");
        publish(&all, &mut doc);
        assert!(doc.replaced.is_empty());
        assert_eq!(doc.divergent.len(), 1);
        // Not a set-aside copy.
        let other = dir.path().join("other.db");
        std::fs::write(&other, b"db").unwrap();
        assert!(locate(&other).is_none());
    }
}
