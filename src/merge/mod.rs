//! `membridge merge FILE`: bring the rows of another claude-mem database (a
//! copy set aside by this or another node, a divergent tail, another
//! machine's old history) into the replicated one.
//!
//! A row is imported when the replicated database has nothing with its
//! natural key ([`specs`]); integer ids are assigned anew and every column
//! that refers to another row is remapped. A row whose key is there with the
//! same content is "present"; with other content it is "conflicting" and
//! kept as the replicated database has it (and listed). Nothing is ever
//! updated or deleted, with one exception that loses nothing: a session the
//! replicated database has without its `memory_session_id` gets the one FILE
//! has, so that FILE's observations and summaries of it attach to it.
//!
//! Writes are ordinary SQLite transactions of at most [`Options::batch`]
//! rows of FILE each, through the mount, so that they are captured and
//! replicated like any other, and claude-mem's worker waits at most one
//! short batch for the write lock. FILE is only read. A second run finds
//! every row present and imports nothing.

pub mod specs;

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::types::Value;
use rusqlite::{params_from_iter, Connection, OpenFlags};

use crate::progress::Progress;
use specs::{Guard, TableSpec};

/// The database claude-mem keeps in its data dir.
pub const DB: &str = "claude-mem.db";
/// Rows of FILE per write transaction: a few milliseconds of the write lock.
pub const BATCH: usize = 200;
/// Conflicts listed per table (all are counted).
const LISTED: usize = 20;

#[derive(Debug, Clone)]
pub struct Options {
    /// Read and count only; the replicated database is opened read-only.
    pub dry_run: bool,
    pub batch: usize,
    /// A bar on a terminal, log lines elsewhere.
    pub progress: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            dry_run: false,
            batch: BATCH,
            progress: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error("{path}: not a claude-mem database: {why}")]
    NotClaudeMem { path: PathBuf, why: String },
    #[error(
        "{file} is at claude-mem schema version {file_version}, the replicated database at \
         {target_version}: merge only joins databases of the same schema (start claude-mem's \
         worker of the same version on a copy of FILE so that it migrates it, then merge the copy)"
    )]
    SchemaMismatch {
        file: PathBuf,
        file_version: i64,
        target_version: i64,
    },
    #[error("table {table} has other columns in {file} than in the replicated database: {why}")]
    Columns {
        file: PathBuf,
        table: String,
        why: String,
    },
    /// The caller's check before a batch failed (e.g. no longer the primary).
    #[error("{why} ({imported} rows were imported before; run merge again to continue)")]
    Stopped { why: String, imported: u64 },
    #[error(
        "{what}: {source} ({imported} rows were imported before; run merge again to continue)"
    )]
    Sqlite {
        what: String,
        source: rusqlite::Error,
        imported: u64,
    },
}

/// What merge found (or did) in one table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableReport {
    pub name: String,
    pub file_rows: u64,
    /// Rows the replicated database lacks: imported, or to import (dry run).
    pub new: u64,
    pub present: u64,
    pub conflicting: u64,
    /// Rows not imported although their key is missing ([`Guard`], or a
    /// reference FILE cannot resolve).
    pub skipped: u64,
    /// Sessions given their `memory_session_id` (see the module docs).
    pub filled: u64,
    /// The first conflicts and skips, one line each.
    pub listed: Vec<String>,
}

#[derive(Debug, Clone, Default)]
pub struct Report {
    pub file: PathBuf,
    pub target: PathBuf,
    pub schema_version: i64,
    pub dry_run: bool,
    pub tables: Vec<TableReport>,
    /// Tables of FILE left alone on purpose: (table or prefix*, why).
    pub not_merged: Vec<(String, String)>,
    /// Tables of FILE this version of merge does not know.
    pub unknown: Vec<String>,
    /// Write transactions that changed something.
    pub transactions: u64,
}

impl Report {
    /// Rows imported (or to import, on a dry run).
    pub fn new_rows(&self) -> u64 {
        self.tables.iter().map(|t| t.new).sum()
    }

    pub fn present(&self) -> u64 {
        self.tables.iter().map(|t| t.present).sum()
    }

    pub fn conflicting(&self) -> u64 {
        self.tables.iter().map(|t| t.conflicting).sum()
    }

    /// The table of counts and the lists, as `merge` prints them.
    pub fn render(&self) -> String {
        let mut s = format!(
            "merge {} into {} (claude-mem schema version {}){}\n",
            self.file.display(),
            self.target.display(),
            self.schema_version,
            if self.dry_run {
                ": dry run, nothing written"
            } else {
                ""
            }
        );
        let new = if self.dry_run { "new" } else { "imported" };
        let _ = writeln!(
            s,
            "  {:<18} {:>8} {:>8} {:>8} {:>11} {:>7}",
            "table", "in FILE", new, "present", "conflicting", "skipped"
        );
        for t in &self.tables {
            let _ = writeln!(
                s,
                "  {:<18} {:>8} {:>8} {:>8} {:>11} {:>7}",
                t.name, t.file_rows, t.new, t.present, t.conflicting, t.skipped
            );
        }
        if self.dry_run {
            let _ = writeln!(s, "would import {} rows", self.new_rows());
        } else {
            let _ = writeln!(
                s,
                "imported {} rows in {} transaction(s)",
                self.new_rows(),
                self.transactions
            );
        }
        for t in self.tables.iter().filter(|t| t.filled > 0) {
            let _ = writeln!(
                s,
                "{}: {} session(s) without a memory_session_id {} it from FILE",
                t.name,
                t.filled,
                if self.dry_run { "would get" } else { "got" }
            );
        }
        if self.tables.iter().any(|t| !t.listed.is_empty()) {
            s += "conflicting rows are kept as they are in the replicated database; skipped rows are not imported:\n";
            for t in &self.tables {
                for line in &t.listed {
                    let _ = writeln!(s, "  {line}");
                }
                let more = (t.conflicting + t.skipped).saturating_sub(t.listed.len() as u64);
                if more > 0 {
                    let _ = writeln!(s, "  {}: ... and {more} more", t.name);
                }
            }
        }
        if !self.not_merged.is_empty() {
            let list: Vec<String> = self
                .not_merged
                .iter()
                .map(|(t, why)| format!("{t} ({why})"))
                .collect();
            let _ = writeln!(s, "not merged: {}", list.join("; "));
        }
        if !self.unknown.is_empty() {
            let _ = writeln!(
                s,
                "not merged, unknown to this version of membridge: {}",
                self.unknown.join(", ")
            );
        }
        s
    }
}

/// Opens FILE read-only without leaving sidecars next to it when it has no
/// WAL, and says whether it is a claude-mem database: its schema version.
pub fn open_file(path: &Path) -> Result<(Connection, i64), MergeError> {
    let not = |why: String| MergeError::NotClaudeMem {
        path: path.to_path_buf(),
        why,
    };
    if !path.is_file() {
        return Err(not("no such file".into()));
    }
    let c = crate::replica::legacy::open_quiet(path)
        .map_err(|e| not(format!("cannot open it: {e}")))?;
    let v = schema_version(&c).map_err(not)?;
    Ok((c, v))
}

/// `max(version)` of `schema_versions`, after checking the tables merge
/// needs are there.
fn schema_version(c: &Connection) -> Result<i64, String> {
    let tables = table_names(c).map_err(|e| match e {
        rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::NotADatabase => {
            "not an SQLite database".to_string()
        }
        e => e.to_string(),
    })?;
    for t in ["schema_versions", "sdk_sessions", "observations"] {
        if !tables.iter().any(|n| n == t) {
            return Err(format!("it has no {t} table"));
        }
    }
    c.query_row("SELECT max(version) FROM schema_versions", [], |r| {
        r.get::<_, Option<i64>>(0)
    })
    .map_err(|e| e.to_string())?
    .ok_or_else(|| "schema_versions is empty".to_string())
}

fn table_names(c: &Connection) -> rusqlite::Result<Vec<String>> {
    c.prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")?
        .query_map([], |r| r.get(0))?
        .collect()
}

/// The replicated database: read-write through the mount (never created),
/// or read-only for a dry run.
fn open_target(path: &Path, dry_run: bool) -> Result<(Connection, i64), MergeError> {
    let not = |why: String| MergeError::NotClaudeMem {
        path: path.to_path_buf(),
        why,
    };
    if !path.is_file() {
        return Err(not(
            "there is none yet: start claude-mem's worker once so that it creates it".into(),
        ));
    }
    let c = if dry_run {
        crate::replica::legacy::open_ro(path)
    } else {
        Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
    }
    .map_err(|e| not(format!("cannot open it: {e}")))?;
    let _ = c.busy_timeout(Duration::from_secs(10));
    if !dry_run {
        // As claude-mem's own connections: a reference to a missing session
        // is refused rather than written.
        let _ = c.execute_batch("PRAGMA foreign_keys = ON");
    }
    let v = schema_version(&c).map_err(not)?;
    Ok((c, v))
}

/// Merges FILE into `target` (the replicated database, through the mount).
/// `before_batch` runs before each write transaction; an error from it
/// stops the merge there (what was committed stays).
pub fn merge(
    file: &Path,
    target: &Path,
    opts: &Options,
    before_batch: &mut dyn FnMut() -> Result<(), String>,
) -> Result<Report, MergeError> {
    let (src, file_version) = open_file(file)?;
    let (dst, target_version) = open_target(target, opts.dry_run)?;
    if file_version != target_version {
        return Err(MergeError::SchemaMismatch {
            file: file.to_path_buf(),
            file_version,
            target_version,
        });
    }
    let sql = |what: &str| {
        let what = what.to_string();
        move |source| MergeError::Sqlite {
            what,
            source,
            imported: 0,
        }
    };
    // One snapshot of FILE (and, on a dry run, of the replicated database).
    src.execute_batch("BEGIN").map_err(sql("reading FILE"))?;
    if opts.dry_run {
        dst.execute_batch("BEGIN")
            .map_err(sql("reading the replicated database"))?;
    }
    let in_file = table_names(&src).map_err(sql("reading FILE"))?;
    let in_target = table_names(&dst).map_err(sql("reading the replicated database"))?;
    let mut report = Report {
        file: file.to_path_buf(),
        target: target.to_path_buf(),
        schema_version: target_version,
        dry_run: opts.dry_run,
        ..Report::default()
    };
    for t in &in_file {
        if specs::spec(t).is_some() {
            continue;
        }
        match specs::not_merged(t) {
            Some((name, why)) => {
                let entry = (name.to_string(), why.to_string());
                if !report.not_merged.contains(&entry) {
                    report.not_merged.push(entry);
                }
            }
            None => report.unknown.push(t.clone()),
        }
    }
    let tables: Vec<&TableSpec> = specs::TABLES
        .iter()
        .filter(|t| in_file.iter().any(|n| n == t.name) && in_target.iter().any(|n| n == t.name))
        .collect();
    let mut total = 0u64;
    for t in &tables {
        let n: i64 = src
            .query_row(&format!("SELECT count(*) FROM \"{}\"", t.name), [], |r| {
                r.get(0)
            })
            .map_err(sql("reading FILE"))?;
        total += n as u64;
    }
    let progress = Progress::counting(
        opts.progress,
        total,
        format!("merging {}", file.display()),
        "rows",
    );
    let mut m = Merger {
        src: &src,
        dst: &dst,
        opts,
        ids: HashMap::new(),
        msid: HashMap::new(),
        new_sessions: HashSet::new(),
        new_tool_uses: HashSet::new(),
        in_txn: false,
        batch_rows: 0,
        batch_changed: false,
        transactions: 0,
        imported: 0,
    };
    for t in tables {
        match m.table(t, &progress, before_batch, file) {
            Ok(r) => report.tables.push(r),
            Err(e) => {
                if m.in_txn {
                    let _ = dst.execute_batch("ROLLBACK");
                }
                progress.finish();
                return Err(e);
            }
        }
    }
    let done = m.commit();
    report.transactions = m.transactions;
    progress.finish();
    done?;
    Ok(report)
}

/// A row's values, in the replicated database's column order without `id`.
type Row = Vec<Value>;

mod merger;

use merger::*;

#[cfg(test)]
mod tests;
