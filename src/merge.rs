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

struct Merger<'a> {
    src: &'a Connection,
    dst: &'a Connection,
    opts: &'a Options,
    /// FILE's ids → the replicated database's, per table (`None`: new on a dry run).
    ids: HashMap<&'static str, HashMap<i64, Option<i64>>>,
    /// FILE's memory_session_id → the replicated database's.
    msid: HashMap<String, String>,
    /// FILE ids of sessions this merge imports.
    new_sessions: HashSet<i64>,
    /// (content_session_id, tool_use_id) of tool uses this merge imports.
    new_tool_uses: HashSet<(String, String)>,
    in_txn: bool,
    batch_rows: usize,
    batch_changed: bool,
    transactions: u64,
    imported: u64,
}

/// Columns of a table: (name, NOT NULL), in declaration order.
fn columns(c: &Connection, table: &str) -> rusqlite::Result<Vec<(String, bool)>> {
    c.prepare(&format!("PRAGMA table_info(\"{table}\")"))?
        .query_map([], |r| {
            Ok((r.get::<_, String>(1)?, r.get::<_, i64>(3)? != 0))
        })?
        .collect()
}

fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `col='value'` for listings, long values cut.
fn show(col: &str, v: &Value) -> String {
    let v = match v {
        Value::Null => "NULL".to_string(),
        Value::Integer(i) => i.to_string(),
        Value::Real(f) => f.to_string(),
        Value::Text(t) => {
            let cut: String = t.chars().take(48).collect();
            if cut.len() < t.len() {
                format!("'{cut}...'")
            } else {
                format!("'{cut}'")
            }
        }
        Value::Blob(b) => format!("<{} bytes>", b.len()),
    };
    format!("{col}={v}")
}

impl Merger<'_> {
    fn err(&self, what: String) -> impl FnOnce(rusqlite::Error) -> MergeError {
        let imported = self.imported;
        move |source| MergeError::Sqlite {
            what,
            source,
            imported,
        }
    }

    fn commit(&mut self) -> Result<(), MergeError> {
        if self.in_txn {
            self.dst
                .execute_batch("COMMIT")
                .map_err(self.err("committing a batch".into()))?;
            self.in_txn = false;
            if self.batch_changed {
                self.transactions += 1;
            }
        }
        Ok(())
    }

    /// A write transaction is open for the next row (none on a dry run).
    fn begin(&mut self, before: &mut dyn FnMut() -> Result<(), String>) -> Result<(), MergeError> {
        if self.opts.dry_run {
            return Ok(());
        }
        if self.in_txn && self.batch_rows >= self.opts.batch.max(1) {
            self.commit()?;
        }
        if !self.in_txn {
            before().map_err(|why| MergeError::Stopped {
                why,
                imported: self.imported,
            })?;
            self.dst
                .execute_batch("BEGIN IMMEDIATE")
                .map_err(self.err("starting a write transaction".into()))?;
            self.in_txn = true;
            self.batch_rows = 0;
            self.batch_changed = false;
        }
        Ok(())
    }

    fn table(
        &mut self,
        spec: &'static TableSpec,
        progress: &Progress,
        before: &mut dyn FnMut() -> Result<(), String>,
        file: &Path,
    ) -> Result<TableReport, MergeError> {
        let name = spec.name;
        let cols = columns(self.dst, name).map_err(self.err(format!("reading {name}")))?;
        let file_cols = columns(self.src, name).map_err(self.err(format!("reading {name}")))?;
        let mut a: Vec<&str> = cols.iter().map(|c| c.0.as_str()).collect();
        let mut b: Vec<&str> = file_cols.iter().map(|c| c.0.as_str()).collect();
        a.sort();
        b.sort();
        if a != b || !a.contains(&"id") {
            return Err(MergeError::Columns {
                file: file.to_path_buf(),
                table: name.into(),
                why: format!("FILE: {}; replicated: {}", b.join(", "), a.join(", ")),
            });
        }
        // Every column but `id`, in the replicated database's order.
        let cols: Vec<(String, bool)> = cols.into_iter().filter(|c| c.0 != "id").collect();
        let idx = |c: &str| cols.iter().position(|x| x.0 == c);
        for c in spec.key.iter().chain(spec.fallback.unwrap_or(&[])) {
            if idx(c).is_none() {
                return Err(MergeError::Columns {
                    file: file.to_path_buf(),
                    table: name.into(),
                    why: format!("no column {c}, part of its natural key"),
                });
            }
        }
        let list = cols
            .iter()
            .map(|c| quote(&c.0))
            .collect::<Vec<_>>()
            .join(", ");
        let select = format!("SELECT id, {list} FROM {} ORDER BY id", quote(name));
        let insert = format!(
            "INSERT INTO {} ({list}) VALUES ({})",
            quote(name),
            vec!["?"; cols.len()].join(", ")
        );
        let mut report = TableReport {
            name: name.into(),
            ..TableReport::default()
        };
        let mut stmt = self
            .src
            .prepare(&select)
            .map_err(self.err(format!("reading {name} of FILE")))?;
        let mut rows = stmt
            .query([])
            .map_err(self.err(format!("reading {name} of FILE")))?;
        let msid_col = idx("memory_session_id");
        loop {
            let row = rows
                .next()
                .map_err(self.err(format!("reading {name} of FILE")))?;
            let Some(row) = row else { break };
            let file_id: i64 = row
                .get(0)
                .map_err(self.err(format!("reading {name} of FILE")))?;
            let original: Row = (1..=cols.len())
                .map(|i| row.get::<_, Value>(i))
                .collect::<rusqlite::Result<_>>()
                .map_err(self.err(format!("reading {name} of FILE")))?;
            report.file_rows += 1;
            progress.inc(1);
            self.begin(before)?;
            self.batch_rows += 1;
            self.row(
                spec,
                &cols,
                &insert,
                msid_col,
                file_id,
                original,
                &mut report,
            )?;
        }
        Ok(report)
    }

    /// One row of FILE: remap, look up, count, import.
    #[allow(clippy::too_many_arguments)]
    fn row(
        &mut self,
        spec: &'static TableSpec,
        cols: &[(String, bool)],
        insert: &str,
        msid_col: Option<usize>,
        file_id: i64,
        original: Row,
        report: &mut TableReport,
    ) -> Result<(), MergeError> {
        let name = spec.name;
        let idx = |c: &str| cols.iter().position(|x| x.0 == c);
        let mut vals = original.clone();
        let mut unresolved: Option<String> = None;
        for (col, table) in spec.id_refs {
            let Some(i) = idx(col) else { continue };
            let Value::Integer(v) = vals[i] else { continue };
            match self.ids.get(table).and_then(|m| m.get(&v)) {
                Some(Some(t)) => vals[i] = Value::Integer(*t),
                Some(None) => {} // new on a dry run: no id yet
                None if cols[i].1 => {
                    unresolved = Some(format!("{col} {v} is not a row of {table} in FILE"))
                }
                None => vals[i] = Value::Null,
            }
        }
        for col in spec.session_refs {
            let Some(i) = idx(col) else { continue };
            if let Value::Text(s) = &vals[i] {
                if let Some(t) = self.msid.get(s) {
                    vals[i] = Value::Text(t.clone());
                }
            }
        }
        let found = self.find(spec, cols, &vals)?;
        let key_text = || {
            spec.key
                .iter()
                .filter_map(|c| idx(c).map(|i| show(c, &vals[i])))
                .collect::<Vec<_>>()
                .join(" ")
        };
        if let Some((tid, mut tvals)) = found {
            self.ids.entry(name).or_default().insert(file_id, Some(tid));
            if name == "sdk_sessions" {
                if let Some(i) = msid_col {
                    self.session_msid(tid, &vals[i], &mut tvals[i], report)?;
                }
            }
            if vals == tvals {
                report.present += 1;
            } else {
                report.conflicting += 1;
                if report.listed.len() < LISTED {
                    let differ: Vec<&str> = cols
                        .iter()
                        .zip(vals.iter().zip(&tvals))
                        .filter(|(_, (a, b))| a != b)
                        .map(|(c, _)| c.0.as_str())
                        .collect();
                    report.listed.push(format!(
                        "{name} {}: conflicting, differs in {}",
                        key_text(),
                        differ.join(", ")
                    ));
                }
            }
            return Ok(());
        }
        let skip = |report: &mut TableReport, why: String| {
            report.skipped += 1;
            if report.listed.len() < LISTED {
                report
                    .listed
                    .push(format!("{name} {}: skipped, {why}", key_text()));
            }
        };
        if let Some(why) = unresolved {
            skip(report, why);
            return Ok(());
        }
        let text = |c: &str| match idx(c).map(|i| &original[i]) {
            Some(Value::Text(s)) => Some(s.clone()),
            _ => None,
        };
        let tool_use = text("content_session_id").zip(text("tool_use_id"));
        if spec.guard == Guard::NewParent {
            let session_new = idx("session_db_id")
                .and_then(|i| match original[i] {
                    Value::Integer(v) => Some(v),
                    _ => None,
                })
                .is_some_and(|v| self.new_sessions.contains(&v));
            let tool_new = tool_use
                .as_ref()
                .is_some_and(|k| self.new_tool_uses.contains(k));
            if !session_new && !tool_new {
                skip(
                    report,
                    "a queue item of a session or tool use the replicated database already has"
                        .into(),
                );
                return Ok(());
            }
        }
        let new_id = if self.opts.dry_run {
            None
        } else {
            match self.dst.execute(insert, params_from_iter(vals.iter())) {
                Ok(_) => Some(self.dst.last_insert_rowid()),
                Err(rusqlite::Error::SqliteFailure(f, msg))
                    if f.code == rusqlite::ErrorCode::ConstraintViolation =>
                {
                    report.conflicting += 1;
                    if report.listed.len() < LISTED {
                        report.listed.push(format!(
                            "{name} {}: conflicting, {}",
                            key_text(),
                            msg.unwrap_or_else(|| f.to_string())
                        ));
                    }
                    return Ok(());
                }
                Err(e) => return Err(self.err(format!("importing into {name}"))(e)),
            }
        };
        report.new += 1;
        if new_id.is_some() {
            self.imported += 1;
            self.batch_changed = true;
        }
        self.ids.entry(name).or_default().insert(file_id, new_id);
        match name {
            "sdk_sessions" => {
                self.new_sessions.insert(file_id);
                if let Some(Value::Text(s)) = msid_col.map(|i| &vals[i]) {
                    self.msid.insert(s.clone(), s.clone());
                }
            }
            "tool_uses" => {
                if let Some(k) = tool_use {
                    self.new_tool_uses.insert(k);
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// A session FILE shares with the replicated database: FILE's rows that
    /// name its memory_session_id are pointed at the replicated one's, and a
    /// session that has none there gets FILE's (unless another session has it).
    fn session_msid(
        &mut self,
        tid: i64,
        file_msid: &Value,
        target_msid: &mut Value,
        report: &mut TableReport,
    ) -> Result<(), MergeError> {
        let Value::Text(f) = file_msid else {
            return Ok(());
        };
        match target_msid {
            Value::Text(t) => {
                self.msid.insert(f.clone(), t.clone());
            }
            _ => {
                let taken: bool = self
                    .dst
                    .query_row(
                        "SELECT EXISTS(SELECT 1 FROM sdk_sessions WHERE memory_session_id = ?1)",
                        [f],
                        |r| r.get(0),
                    )
                    .map_err(self.err("reading sdk_sessions".into()))?;
                if taken {
                    return Ok(());
                }
                if !self.opts.dry_run {
                    self.dst
                        .execute(
                            "UPDATE sdk_sessions SET memory_session_id = ?1 WHERE id = ?2 AND memory_session_id IS NULL",
                            rusqlite::params![f, tid],
                        )
                        .map_err(self.err("updating sdk_sessions".into()))?;
                    self.batch_changed = true;
                }
                report.filled += 1;
                *target_msid = file_msid.clone();
                self.msid.insert(f.clone(), f.clone());
            }
        }
        Ok(())
    }

    /// The replicated database's row with `vals`'s natural key: its id and
    /// values (same column order).
    fn find(
        &self,
        spec: &TableSpec,
        cols: &[(String, bool)],
        vals: &Row,
    ) -> Result<Option<(i64, Row)>, MergeError> {
        let idx = |c: &str| cols.iter().position(|x| x.0 == c).expect("checked");
        let mut tried = false;
        for key in std::iter::once(spec.key).chain(spec.fallback) {
            let usable = key.iter().all(|c| vals[idx(c)] != Value::Null);
            if !usable {
                continue;
            }
            tried = true;
            if let Some(hit) = self.lookup(spec.name, cols, key, vals)? {
                return Ok(Some(hit));
            }
        }
        if tried {
            return Ok(None);
        }
        // NULL in every key: only the very same row counts as present.
        let all: Vec<&str> = cols.iter().map(|c| c.0.as_str()).collect();
        self.lookup(spec.name, cols, &all, vals)
    }

    fn lookup(
        &self,
        table: &str,
        cols: &[(String, bool)],
        key: &[&str],
        vals: &Row,
    ) -> Result<Option<(i64, Row)>, MergeError> {
        let list = cols
            .iter()
            .map(|c| quote(&c.0))
            .collect::<Vec<_>>()
            .join(", ");
        let cond = key
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{} IS ?{}", quote(c), i + 1))
            .collect::<Vec<_>>()
            .join(" AND ");
        let sql = format!(
            "SELECT id, {list} FROM {} WHERE {cond} ORDER BY id LIMIT 1",
            quote(table)
        );
        let what = || format!("looking up {table} in the replicated database");
        let mut stmt = self.dst.prepare_cached(&sql).map_err(self.err(what()))?;
        let params = key
            .iter()
            .map(|c| &vals[cols.iter().position(|x| x.0 == *c).expect("checked")]);
        let mut rows = stmt
            .query(params_from_iter(params))
            .map_err(self.err(what()))?;
        let Some(r) = rows.next().map_err(self.err(what()))? else {
            return Ok(None);
        };
        let id: i64 = r.get(0).map_err(self.err(what()))?;
        let vals: Row = (1..=cols.len())
            .map(|i| r.get::<_, Value>(i))
            .collect::<rusqlite::Result<_>>()
            .map_err(self.err(what()))?;
        Ok(Some((id, vals)))
    }
}

#[cfg(test)]
mod tests;
