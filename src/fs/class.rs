//! Path classes: which files are replicated databases, replicated files or local.
//!
//! Decided once per lookup from the path relative to the mount dir, so the hot
//! read/write path only reads a tag. A database's `-wal`, `-shm` and `-journal`
//! belong to the database engine: they are classified with their database.

use std::path::Path;

use glob::{MatchOptions, Pattern};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathClass {
    /// Host-local: plain passthrough on every node (logs, pid files, chroma/).
    Local,
    /// A replicated SQLite database; the string is its path relative to the mount.
    Database(String),
    /// A sidecar of a replicated database.
    Sidecar(String, Sidecar),
    /// A file replicated as whole versions.
    File(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sidecar {
    Wal,
    Shm,
    Journal,
}

impl PathClass {
    pub fn label(&self) -> &'static str {
        match self {
            PathClass::Local => "local",
            PathClass::Database(_) => "replicated-database",
            PathClass::Sidecar(..) => "database-sidecar",
            PathClass::File(_) => "replicated-file",
        }
    }
}

/// The old tool's temporary files next to the database: its pull's
/// download (`tempfile.mkstemp(suffix=".db.tmp")`) and its push's snapshot
/// (`suffix=".snap.db"`), both `tmp` plus random characters.
pub fn is_old_tool_temp(name: &std::ffi::OsStr) -> bool {
    let n = name.to_string_lossy();
    n.starts_with("tmp") && (n.ends_with(".db.tmp") || n.ends_with(".snap.db"))
}

const OPTS: MatchOptions = MatchOptions {
    case_sensitive: true,
    require_literal_separator: true,
    require_literal_leading_dot: false,
};

#[derive(Debug, Clone)]
pub struct Classifier {
    databases: Vec<Pattern>,
    files: Vec<Pattern>,
}

impl Classifier {
    /// Globs were validated by config; an invalid one here is a programming error.
    pub fn new(databases: &[String], files: &[String]) -> Classifier {
        let compile = |gs: &[String]| {
            gs.iter()
                .filter_map(|g| Pattern::new(g).ok())
                .collect::<Vec<_>>()
        };
        Classifier {
            databases: compile(databases),
            files: compile(files),
        }
    }

    fn is_db(&self, rel: &str) -> bool {
        self.databases.iter().any(|p| p.matches_with(rel, OPTS))
    }

    pub fn classify(&self, rel: &Path) -> PathClass {
        let Some(rel) = rel.to_str() else {
            return PathClass::Local; // globs are UTF-8; such a name can't match one
        };
        if self.is_db(rel) {
            return PathClass::Database(rel.to_string());
        }
        for (suffix, kind) in [
            ("-wal", Sidecar::Wal),
            ("-shm", Sidecar::Shm),
            ("-journal", Sidecar::Journal),
        ] {
            if let Some(db) = rel.strip_suffix(suffix) {
                if self.is_db(db) {
                    return PathClass::Sidecar(db.to_string(), kind);
                }
            }
        }
        if self.files.iter().any(|p| p.matches_with(rel, OPTS)) {
            return PathClass::File(rel.to_string());
        }
        PathClass::Local
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_classes() {
        let c = Classifier::new(&["claude-mem.db".into()], &["settings.json".into()]);
        let cl = |p: &str| c.classify(Path::new(p));
        assert_eq!(
            cl("claude-mem.db"),
            PathClass::Database("claude-mem.db".into())
        );
        assert_eq!(
            cl("claude-mem.db-wal"),
            PathClass::Sidecar("claude-mem.db".into(), Sidecar::Wal)
        );
        assert_eq!(
            cl("claude-mem.db-journal"),
            PathClass::Sidecar("claude-mem.db".into(), Sidecar::Journal)
        );
        assert_eq!(cl("settings.json"), PathClass::File("settings.json".into()));
        assert_eq!(cl("logs/claude-mem.db"), PathClass::Local);
        assert_eq!(cl("worker.pid"), PathClass::Local);
        assert_eq!(cl("chroma/chroma.sqlite3"), PathClass::Local);
    }

    #[test]
    fn globs_do_not_cross_directories() {
        let c = Classifier::new(&["*.db".into(), "dbs/**/*.sqlite".into()], &[]);
        assert!(matches!(
            c.classify(Path::new("a.db")),
            PathClass::Database(_)
        ));
        assert_eq!(c.classify(Path::new("x/a.db")), PathClass::Local);
        assert!(matches!(
            c.classify(Path::new("dbs/p/q.sqlite")),
            PathClass::Database(_)
        ));
    }
}
