//! `merge` against the tables of claude-mem 13.25.3 it remaps (a trimmed
//! copy of its schema): ids, references, FTS triggers, idempotence, refusals.

use super::*;

/// The tables of claude-mem 13.25.3 that merge remaps, as its worker
/// creates them (trimmed to the columns and indexes that matter here).
const SCHEMA: &str = "
    PRAGMA journal_mode = WAL;
    CREATE TABLE schema_versions (id INTEGER PRIMARY KEY, version INTEGER UNIQUE NOT NULL, applied_at TEXT NOT NULL);
    INSERT INTO schema_versions (version, applied_at) VALUES (51, 't'), (52, 't');
    CREATE TABLE sdk_sessions (id INTEGER PRIMARY KEY AUTOINCREMENT, content_session_id TEXT NOT NULL,
        memory_session_id TEXT UNIQUE, project TEXT NOT NULL, platform_source TEXT NOT NULL DEFAULT 'claude',
        started_at_epoch INTEGER NOT NULL, status TEXT NOT NULL DEFAULT 'active');
    CREATE UNIQUE INDEX ux_sdk_sessions_platform_content ON sdk_sessions(platform_source, content_session_id);
    CREATE TABLE observations (id INTEGER PRIMARY KEY AUTOINCREMENT, memory_session_id TEXT NOT NULL,
        title TEXT, narrative TEXT, created_at_epoch INTEGER NOT NULL, content_hash TEXT,
        FOREIGN KEY(memory_session_id) REFERENCES sdk_sessions(memory_session_id) ON DELETE CASCADE ON UPDATE CASCADE);
    CREATE UNIQUE INDEX ux_observations_session_hash ON observations(memory_session_id, content_hash);
    CREATE VIRTUAL TABLE observations_fts USING fts5(title, narrative, content='observations', content_rowid='id');
    CREATE TRIGGER observations_ai AFTER INSERT ON observations BEGIN
        INSERT INTO observations_fts(rowid, title, narrative) VALUES (new.id, new.title, new.narrative); END;
    CREATE TABLE user_prompts (id INTEGER PRIMARY KEY AUTOINCREMENT, session_db_id INTEGER,
        content_session_id TEXT NOT NULL, prompt_number INTEGER NOT NULL, prompt_text TEXT NOT NULL,
        FOREIGN KEY(session_db_id) REFERENCES sdk_sessions(id) ON DELETE CASCADE);
    CREATE TABLE tool_uses (id INTEGER PRIMARY KEY AUTOINCREMENT, tool_use_id TEXT NOT NULL,
        content_session_id TEXT NOT NULL, memory_session_id TEXT, session_db_id INTEGER,
        observation_id INTEGER, UNIQUE(content_session_id, tool_use_id));
    CREATE TABLE pending_messages (id INTEGER PRIMARY KEY AUTOINCREMENT, session_db_id INTEGER NOT NULL,
        content_session_id TEXT NOT NULL, tool_use_id TEXT,
        FOREIGN KEY (session_db_id) REFERENCES sdk_sessions(id) ON DELETE CASCADE);
    CREATE TABLE sync_state (k TEXT PRIMARY KEY, v TEXT);
";

fn db(dir: &Path, name: &str, rows: &str) -> PathBuf {
    let p = dir.join(name);
    let c = Connection::open(&p).unwrap();
    c.execute_batch(SCHEMA).unwrap();
    c.execute_batch(rows).unwrap();
    p
}

fn count(p: &Path, sql: &str) -> i64 {
    Connection::open(p)
        .unwrap()
        .query_row(sql, [], |r| r.get(0))
        .unwrap()
}

fn run(file: &Path, target: &Path, dry_run: bool) -> Report {
    let opts = Options {
        dry_run,
        batch: 2,
        progress: false,
    };
    merge(file, target, &opts, &mut || Ok(())).unwrap()
}

fn table<'a>(r: &'a Report, name: &str) -> &'a TableReport {
    r.tables.iter().find(|t| t.name == name).unwrap()
}

#[test]
fn imports_by_natural_key_and_remaps_ids() {
    let dir = tempfile::tempdir().unwrap();
    // The replicated database: a session both have (with no memory
    // session id yet here), and one of its own that shifts the ids.
    let target = db(
        dir.path(),
        "target.db",
        "INSERT INTO sdk_sessions (content_session_id, memory_session_id, project, started_at_epoch)
            VALUES ('own', 'm-own', 'p', 1), ('shared', NULL, 'p', 2);
         INSERT INTO observations (memory_session_id, title, narrative, created_at_epoch, content_hash)
            VALUES ('m-own', 'own obs', 'alpha', 1, 'h0');
         INSERT INTO user_prompts (session_db_id, content_session_id, prompt_number, prompt_text)
            VALUES (2, 'shared', 1, 'first prompt');
         INSERT INTO sync_state VALUES ('cursor', 'target');",
    );
    let file = db(
        dir.path(),
        "file.db",
        "INSERT INTO sdk_sessions (content_session_id, memory_session_id, project, started_at_epoch, status)
            VALUES ('shared', 'm-shared', 'p', 2, 'completed'), ('theirs', 'm-theirs', 'p', 3, 'active');
         INSERT INTO observations (memory_session_id, title, narrative, created_at_epoch, content_hash)
            VALUES ('m-shared', 'shared obs', 'bravo', 5, 'h1'),
                   ('m-theirs', 'their obs', 'charlie', 6, 'h2'),
                   ('m-theirs', 'old obs', 'delta', 7, NULL);
         INSERT INTO user_prompts (session_db_id, content_session_id, prompt_number, prompt_text)
            VALUES (1, 'shared', 1, 'first prompt'), (1, 'shared', 2, 'second prompt'),
                   (2, 'theirs', 1, 'their prompt');
         INSERT INTO tool_uses (tool_use_id, content_session_id, memory_session_id, session_db_id, observation_id)
            VALUES ('t1', 'theirs', 'm-theirs', 2, 2);
         INSERT INTO pending_messages (session_db_id, content_session_id, tool_use_id)
            VALUES (2, 'theirs', 't1'), (1, 'shared', 't0');
         INSERT INTO sync_state VALUES ('cursor', 'file');",
    );
    let dry = run(&file, &target, true);
    assert_eq!(
        (dry.new_rows(), dry.conflicting()),
        (8, 1),
        "{}",
        dry.render()
    );
    assert_eq!(count(&target, "SELECT count(*) FROM observations"), 1);

    let r = run(&file, &target, false);
    println!("{}", r.render());
    assert_eq!(r.new_rows(), dry.new_rows());
    let s = table(&r, "sdk_sessions");
    assert_eq!((s.new, s.present, s.conflicting, s.filled), (1, 0, 1, 1));
    assert_eq!(table(&r, "user_prompts").present, 1);
    let p = table(&r, "pending_messages");
    assert_eq!((p.new, p.skipped), (1, 1), "{p:?}");
    let skipped: Vec<&str> = r.not_merged.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(
        skipped,
        [
            "observations_fts*",
            "schema_versions",
            "sqlite_sequence",
            "sync_*"
        ]
    );
    assert!(r.transactions >= 3, "batches of 2 rows: {}", r.transactions);

    // Ids are the target's; references follow them.
    let theirs = count(
        &target,
        "SELECT id FROM sdk_sessions WHERE content_session_id = 'theirs'",
    );
    assert_eq!(theirs, 3);
    assert_eq!(
        count(
            &target,
            "SELECT session_db_id FROM user_prompts WHERE prompt_text = 'their prompt'"
        ),
        theirs
    );
    assert_eq!(
        count(
            &target,
            "SELECT session_db_id FROM user_prompts WHERE prompt_text = 'second prompt'"
        ),
        2
    );
    let obs = count(
        &target,
        "SELECT id FROM observations WHERE title = 'their obs'",
    );
    assert_eq!(
        count(
            &target,
            "SELECT observation_id FROM tool_uses WHERE tool_use_id = 't1'"
        ),
        obs
    );
    assert_eq!(
        count(&target, "SELECT session_db_id FROM pending_messages"),
        theirs
    );
    // The shared session kept its content but got FILE's memory session id,
    // so FILE's observation of it attaches.
    assert_eq!(
        count(&target, "SELECT count(*) FROM sdk_sessions WHERE memory_session_id = 'm-shared' AND status = 'active'"),
        1
    );
    // FTS rows come from claude-mem's trigger.
    assert_eq!(
        count(&target, "SELECT count(*) FROM observations_fts WHERE observations_fts MATCH 'bravo OR charlie OR delta'"),
        3
    );
    assert_eq!(count(&target, "SELECT v = 'target' FROM sync_state"), 1);

    // Idempotent.
    let again = run(&file, &target, false);
    assert_eq!(again.new_rows(), 0, "{}", again.render());
    assert_eq!(again.transactions, 0);
    assert_eq!(count(&target, "SELECT count(*) FROM observations"), 4);
}

#[test]
fn refuses_other_schemas_and_other_files() {
    let dir = tempfile::tempdir().unwrap();
    let target = db(dir.path(), "target.db", "");
    let newer = db(
        dir.path(),
        "newer.db",
        "INSERT INTO schema_versions (version, applied_at) VALUES (53, 't');",
    );
    let e = merge(&newer, &target, &Options::default(), &mut || Ok(())).unwrap_err();
    assert!(
        matches!(
            e,
            MergeError::SchemaMismatch {
                file_version: 53,
                target_version: 52,
                ..
            }
        ),
        "{e}"
    );
    let plain = dir.path().join("plain.db");
    Connection::open(&plain)
        .unwrap()
        .execute_batch("CREATE TABLE t(x)")
        .unwrap();
    let e = merge(&plain, &target, &Options::default(), &mut || Ok(())).unwrap_err();
    assert!(e.to_string().contains("no schema_versions table"), "{e}");
    let junk = dir.path().join("junk.db");
    std::fs::write(&junk, vec![7u8; 8192]).unwrap();
    let e = merge(&junk, &target, &Options::default(), &mut || Ok(())).unwrap_err();
    assert!(e.to_string().contains("not a claude-mem database"), "{e}");
    // A stop asked before a batch ends the merge there.
    let file = db(
        dir.path(),
        "file.db",
        "INSERT INTO sdk_sessions (content_session_id, project, started_at_epoch) VALUES ('a', 'p', 1);",
    );
    let e = merge(&file, &target, &Options::default(), &mut || {
        Err("demoted".into())
    })
    .unwrap_err();
    assert!(matches!(e, MergeError::Stopped { imported: 0, .. }), "{e}");
}
