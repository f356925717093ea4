//! The import itself: per table, each row of FILE looked up by its natural
//! key, imported with its ids remapped, or counted present or conflicting.

use super::*;

pub(super) struct Merger<'a> {
    pub(super) src: &'a Connection,
    pub(super) dst: &'a Connection,
    pub(super) opts: &'a Options,
    /// FILE's ids → the replicated database's, per table (`None`: new on a dry run).
    pub(super) ids: HashMap<&'static str, HashMap<i64, Option<i64>>>,
    /// FILE's memory_session_id → the replicated database's.
    pub(super) msid: HashMap<String, String>,
    /// FILE ids of sessions this merge imports.
    pub(super) new_sessions: HashSet<i64>,
    /// (content_session_id, tool_use_id) of tool uses this merge imports.
    pub(super) new_tool_uses: HashSet<(String, String)>,
    pub(super) in_txn: bool,
    pub(super) batch_rows: usize,
    pub(super) batch_changed: bool,
    pub(super) transactions: u64,
    pub(super) imported: u64,
}

/// Columns of a table: (name, NOT NULL), in declaration order.
pub(super) fn columns(c: &Connection, table: &str) -> rusqlite::Result<Vec<(String, bool)>> {
    c.prepare(&format!("PRAGMA table_info(\"{table}\")"))?
        .query_map([], |r| {
            Ok((r.get::<_, String>(1)?, r.get::<_, i64>(3)? != 0))
        })?
        .collect()
}

pub(super) fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `col='value'` for listings, long values cut.
pub(super) fn show(col: &str, v: &Value) -> String {
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
    pub(super) fn err(&self, what: String) -> impl FnOnce(rusqlite::Error) -> MergeError {
        let imported = self.imported;
        move |source| MergeError::Sqlite {
            what,
            source,
            imported,
        }
    }

    pub(super) fn commit(&mut self) -> Result<(), MergeError> {
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
    pub(super) fn begin(
        &mut self,
        before: &mut dyn FnMut() -> Result<(), String>,
    ) -> Result<(), MergeError> {
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

    pub(super) fn table(
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
    pub(super) fn row(
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
    pub(super) fn session_msid(
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
    pub(super) fn find(
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

    pub(super) fn lookup(
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
