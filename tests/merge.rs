//! `membridge merge` (issue 16) with claude-mem 13.25.3's real worker: no
//! memory is left behind when histories meet.
//!
//! - Two machines with their own history before membridge: one becomes the
//!   primary, the other joins as a secondary (its database set aside, counted,
//!   DEGRADED) and its history is merged into the primary; the worker then
//!   finds both histories (search, context injection), the counts are the
//!   union by natural key, a second merge imports nothing, the joining
//!   machine's copy clears by itself and its dump is the primary's.
//! - A primary killed with a tail the bucket never got: after failover and its
//!   restart the tail is set aside (divergent and replaced copies, DEGRADED),
//!   merging it on the new primary brings back every commit it acknowledged;
//!   the merged copy is marked, the other dismissed.
//!
//! Needs Bun and claude-mem from `scripts/install-deps.sh`, like tests/claude_mem.rs.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use common::claude_mem::{sqlite3, Client, Worker, PROJECT};
use common::mount::Mount;
use common::wait_for;
use common::SeaweedFs;
use serde_json::json;

const DB: &str = "claude-mem.db";
/// claude-mem's one-time migration markers (kept with the database).
const MARKERS: [&str; 2] = [".cwd-remap-applied-v1", ".cleanup-v12.4.3-applied"];

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn query(db: &Path, sql: &str) -> i64 {
    sqlite3(db, sql)
        .unwrap_or_else(|e| panic!("{e}"))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// A prompt as the UserPromptSubmit hook sends it.
fn prompted(w: &Worker, session: &str, prompt: &str) {
    let (status, body) = w
        .post(
            "/api/sessions/init",
            &json!({"contentSessionId": session, "project": PROJECT, "prompt": prompt,
                    "platformSource": "claude-code"}),
        )
        .unwrap();
    assert_eq!(status, 200, "{}: prompt {prompt:?}: {body}", w.name);
}

/// A machine's history before membridge, written by claude-mem's worker on a
/// plain directory: a session through every hook, a saved memory and an
/// imported session (observation and summary). Every word it wrote carries `word`.
fn history(client: &Client, name: &str, word: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let w = Worker::start(client, name, dir.path());
    w.wait_initialized(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
    for r in w.session(
        &format!("{name}-s1"),
        &format!("{word} prompt: frobnicate the {word} widgets"),
    ) {
        assert_eq!(r.code, Some(0), "{name}: hook {}: {r:?}", r.event);
    }
    w.saved(&format!("{word} saved memory"));
    let (status, body) = w.import_session(
        &format!("{name}-imp"),
        &format!("{word} imported observation"),
    );
    assert_eq!(status, 200, "{name}: import: {body}");
    let stop = w.lifecycle("stop");
    assert_eq!(stop.code, Some(0), "{name}: stop: {stop:?}");
    drop(w);
    dir
}

/// Rows by natural key (merge's, from src/merge/specs.rs) in the union of
/// databases `a` and `b`: what the merged database must hold.
fn union_counts(a: &Path, b: &Path) -> BTreeMap<&'static str, i64> {
    let keys = [
        ("sdk_sessions", "platform_source, content_session_id"),
        ("user_prompts", "content_session_id, prompt_number"),
        (
            "observations",
            "memory_session_id, coalesce(content_hash, title || '@' || created_at_epoch)",
        ),
        (
            "session_summaries",
            "memory_session_id, prompt_number, created_at_epoch",
        ),
        ("tool_uses", "content_session_id, tool_use_id"),
    ];
    let c = rusqlite::Connection::open_in_memory().unwrap();
    c.execute("ATTACH ?1 AS a", [a.to_str().unwrap()]).unwrap();
    c.execute("ATTACH ?1 AS b", [b.to_str().unwrap()]).unwrap();
    keys.iter()
        .map(|(t, k)| {
            let n: i64 = c
                .query_row(
                    &format!(
                        "SELECT count(*) FROM (SELECT {k} FROM a.{t} UNION SELECT {k} FROM b.{t})"
                    ),
                    [],
                    |r| r.get(0),
                )
                .unwrap();
            (*t, n)
        })
        .collect()
}

fn counts(db: &Path) -> BTreeMap<&'static str, i64> {
    [
        "sdk_sessions",
        "user_prompts",
        "observations",
        "session_summaries",
        "tool_uses",
    ]
    .into_iter()
    .map(|t| (t, query(db, &format!("SELECT count(*) FROM {t}"))))
    .collect()
}

/// `membridge merge`'s table: per table, (in FILE, new, present, conflicting).
fn merge_table(out: &str) -> BTreeMap<String, [u64; 4]> {
    out.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let nums: Vec<u64> = f.get(1..6)?.iter().filter_map(|x| x.parse().ok()).collect();
            (f.len() == 6 && nums.len() == 5)
                .then(|| (f[0].to_string(), [nums[0], nums[1], nums[2], nums[3]]))
        })
        .collect()
}

fn files_of(dir: &Path) -> Vec<(String, Vec<u8>)> {
    std::iter::once(DB)
        .chain(MARKERS)
        .filter_map(|n| Some((n.to_string(), std::fs::read(dir.join(n)).ok()?)))
        .collect()
}

#[test]
fn two_machines_histories_meet_on_the_primary() {
    let client = Client::find();
    let x = history(&client, "desktop", "alpaca");
    let y = history(&client, "laptop", "bison");
    let (xdb, ydb) = (x.path().join(DB), y.path().join(DB));
    let want = union_counts(&xdb, &ydb);
    let (before_x, before_y) = (counts(&xdb), counts(&ydb));
    println!("desktop {before_x:?}\nlaptop {before_y:?}\nunion {want:?}");

    // The desktop adopts membridge with its own history.
    let s3 = SeaweedFs::shared();
    let mut env = s3.env(&s3.new_bucket("merge"), "merge");
    env.push(("MEMBRIDGE_NODE_ID".into(), "desktop".into()));
    let files = files_of(x.path());
    let files: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(n, b)| (n.as_str(), b.as_slice()))
        .collect();
    let a = Mount::with_files(env.clone(), &files);
    assert_eq!(a.status()["role"], "primary");
    let adb = a.dir.join(DB);
    let ypath = ydb.to_str().unwrap();

    // Dry run: the laptop's rows, counted against the desktop's by key.
    let out = a.run(&["merge", "--dry-run", ypath]);
    let dry = text(&out);
    println!("{dry}");
    assert!(out.status.success(), "{dry}");
    assert_eq!(counts(&adb), before_x, "a dry run wrote");
    let table = merge_table(&dry);
    for (t, n) in &want {
        let [in_file, new, present, conflicting] = table[*t];
        assert_eq!(in_file as i64, before_y[t], "{t}: {dry}");
        assert_eq!(
            before_x[t] + new as i64,
            *n,
            "{t}: new rows are the union's: {dry}"
        );
        assert_eq!(new + present + conflicting, in_file, "{t}: {dry}");
    }

    // Refusals: another schema, another kind of file, a secondary.
    let scratch = tempfile::tempdir().unwrap();
    let newer = scratch.path().join("newer.db");
    std::fs::copy(&ydb, &newer).unwrap();
    rusqlite::Connection::open(&newer)
        .unwrap()
        .execute(
            "INSERT INTO schema_versions (version, applied_at) VALUES (99, 'x')",
            [],
        )
        .unwrap();
    let out = a.run(&["merge", newer.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("schema version 99"), "{}", text(&out));
    let plain = scratch.path().join("plain.db");
    rusqlite::Connection::open(&plain)
        .unwrap()
        .execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1);")
        .unwrap();
    let out = a.run(&["merge", plain.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("not a claude-mem database"),
        "{}",
        text(&out)
    );
    let out = a.run(&["merge", "--dismiss", ypath]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("not a set-aside copy"),
        "{}",
        text(&out)
    );

    // The laptop joins with its own history: the bucket's copy replaces it,
    // its database is set aside, loudly, and the daemon counts what it holds.
    let mut env_b = env.clone();
    env_b.retain(|(k, _)| k != "MEMBRIDGE_NODE_ID");
    env_b.push(("MEMBRIDGE_NODE_ID".into(), "laptop".into()));
    let yfiles = files_of(y.path());
    let yfiles: Vec<(&str, &[u8])> = yfiles
        .iter()
        .map(|(n, b)| (n.as_str(), b.as_slice()))
        .collect();
    let b = Mount::with_files(env_b, &yfiles);
    assert_eq!(b.status()["role"], "secondary");
    wait_for(
        "the laptop's copy to be set aside",
        Duration::from_secs(30),
        || set_aside(&b).1.len() == 1,
    );
    let replaced = set_aside(&b).1;
    let check = format!("{}.check", replaced[0]);
    wait_for(
        "the laptop's copy to be checked",
        Duration::from_secs(30),
        || Path::new(&check).exists(),
    );
    let c: serde_json::Value = serde_json::from_slice(&std::fs::read(&check).unwrap()).unwrap();
    let would: u64 = table.values().map(|t| t[1]).sum();
    assert_eq!(c["new_rows"], would, "{c}");
    let out = b.run(&["doctor", b.dir.to_str().unwrap()]);
    let doc = text(&out);
    assert_eq!(out.status.code(), Some(4), "{doc}");
    assert!(
        doc.contains("[warn] set-aside copy")
            && doc.contains(&format!("{would} row(s) the replicated database lacks"))
            && doc.contains(&format!("membridge merge {}", replaced[0])),
        "{doc}"
    );
    // A merge runs on the primary only.
    let out = b.run(&["merge", ypath]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(
        text(&out).contains("run it on the primary"),
        "{}",
        text(&out)
    );

    // The merge, through the mount: counts are the union by natural key.
    let t = Instant::now();
    let out = a.run(&["merge", ypath]);
    let merged = text(&out);
    println!("{merged}(took {:?})", t.elapsed());
    assert!(out.status.success(), "{merged}");
    assert_eq!(counts(&adb), want, "{merged}");
    assert_eq!(
        query(
            &adb,
            "SELECT count(*) FROM pragma_integrity_check WHERE integrity_check = 'ok'"
        ),
        1
    );
    for (fts, n) in [
        ("observations_fts", 2),
        ("user_prompts_fts", 1),
        ("session_summaries_fts", 1),
    ] {
        let found = query(
            &adb,
            &format!("SELECT count(*) FROM {fts} WHERE {fts} MATCH 'bison'"),
        );
        assert!(found >= n, "{fts}: {found} rows match an imported word");
    }
    let c = rusqlite::Connection::open(&adb).unwrap();
    c.busy_timeout(Duration::from_secs(5)).unwrap();
    for fts in [
        "observations_fts",
        "user_prompts_fts",
        "session_summaries_fts",
    ] {
        c.execute(
            &format!("INSERT INTO {fts}({fts}, rank) VALUES ('integrity-check', 1)"),
            [],
        )
        .unwrap_or_else(|e| panic!("{fts}: {e}"));
    }
    drop(c);

    // Idempotent.
    let out = a.run(&["merge", ypath]);
    let again = text(&out);
    assert!(
        out.status.success() && again.contains("imported 0 rows"),
        "{again}"
    );
    assert_eq!(counts(&adb), want);

    // claude-mem's worker on the primary finds both histories.
    let w = Worker::start(&client, "desktop-mounted", &a.dir);
    w.wait_initialized(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
    for word in ["alpaca", "bison"] {
        let (status, body) = w.search(word);
        assert_eq!(status, 200, "{body}");
        for want in [
            format!("{word} saved memory"),
            format!("{word} imported observation"),
            format!("{word} prompt"),
        ] {
            assert!(
                body.contains(&want),
                "search {word:?} lacks {want:?}:\n{body}"
            );
        }
    }
    let (status, ctx) = w.context();
    assert_eq!(status, 200);
    for want in ["alpaca imported observation", "bison imported observation"] {
        assert!(ctx.contains(want), "context lacks {want:?}:\n{ctx}");
    }
    let stop = w.lifecycle("stop");
    assert_eq!(stop.code, Some(0), "{stop:?}");
    drop(w);

    // The laptop's own copy, set aside when it joined, cleared by itself
    // once its view holds every row of it; its dump is the primary's.
    wait_for(
        "the laptop's set-aside copy to clear",
        Duration::from_secs(40),
        || set_aside(&b).1.is_empty(),
    );
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(format!("{}.resolved", replaced[0])).unwrap())
            .unwrap();
    assert_eq!(r["how"], "contained", "{r}");
    let out = b.run(&["pull"]);
    assert!(out.status.success(), "{}", text(&out));
    let bdb = b.dir.join(DB);
    wait_for(
        "the secondary's dump to be the primary's",
        Duration::from_secs(30),
        || sqlite3(&adb, ".dump").ok() == sqlite3(&bdb, ".dump").ok(),
    );
    assert_eq!(counts(&bdb), want);
}

/// The newest `.json` report's copy, and the replaced copies, on `m`.
fn set_aside(m: &Mount) -> (Vec<String>, Vec<String>) {
    let st = m.status();
    let list = |k: &str| -> Vec<String> {
        st[k]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    (list("divergent"), list("replaced"))
}

#[test]
fn a_divergent_tail_merges_back_into_the_new_primary() {
    let client = Client::find();
    let s3 = SeaweedFs::shared();
    let mut env = s3.env(&s3.new_bucket("merge-tail"), "merge-tail");
    env.push(("LEADERSHIP_LEASE_SECONDS".into(), "3".into()));
    let gate = common::gate::Gate::start(s3.s3_port());
    let mut env_a = env.clone();
    for (k, v) in env_a.iter_mut() {
        if k == "MINIO_ENDPOINT" {
            *v = gate.endpoint.clone();
        }
    }
    env_a.push(("MEMBRIDGE_NODE_ID".into(), "node-a".into()));
    let a = Mount::with_files(env_a, &[]);
    assert_eq!(a.status()["role"], "primary");
    let wa = Worker::start(&client, "node-a", &a.dir);
    wa.wait_initialized(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
    let mut acked = Vec::new();
    for i in 0..3 {
        let title = format!("published memory {i}");
        wa.saved(&title);
        acked.push(title);
    }
    prompted(&wa, "sess-a", "published prompt about yaks");
    let published = |m: &Mount| {
        let d = &m.status()["databases"][DB];
        d["uploaded_txid"].as_u64().is_some() && d["uploaded_txid"] == d["head_txid"]
    };
    wait_for("A to publish", Duration::from_secs(20), || published(&a));

    // A keeps acknowledging while the bucket is out of its reach, then dies.
    gate.close();
    for i in 0..5 {
        let title = format!("tail memory {i}");
        wa.saved(&title);
        acked.push(title);
    }
    prompted(&wa, "sess-a", "tail prompt about zebus");
    let st = a.status();
    assert!(!published(&a), "the tail reached the bucket: {st}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(a.pid()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wa.kill();

    // B takes over and writes its own.
    let mut env_b = env.clone();
    env_b.push(("MEMBRIDGE_NODE_ID".into(), "node-b".into()));
    let b = Mount::with_files(env_b, &[]);
    wait_for("B to take over", Duration::from_secs(30), || {
        b.status()["role"] == "primary"
    });
    let bdb = b.dir.join(DB);
    let wb = Worker::start(&client, "node-b", &b.dir);
    wb.wait_initialized(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
    wb.saved("written on b");
    let stop = wb.lifecycle("stop");
    assert_eq!(stop.code, Some(0), "{stop:?}");
    drop(wb);
    let titles = |db: &Path| {
        let list = acked
            .iter()
            .map(|t| format!("'{t}'"))
            .collect::<Vec<_>>()
            .join(",");
        query(
            db,
            &format!("SELECT count(DISTINCT title) FROM observations WHERE title IN ({list})"),
        )
    };
    assert_eq!(titles(&bdb), 3, "B has only what A published");

    // A comes back: its tail is set aside, loudly, with the way back.
    gate.open();
    a.mount();
    wait_for("A to follow B", Duration::from_secs(30), || {
        a.status()["role"] == "secondary"
            && sqlite3(
                &a.dir.join(DB),
                "SELECT count(*) FROM observations WHERE title = 'written on b'",
            )
            .is_ok_and(|n| n.trim() == "1")
    });
    let (divergent, replaced) = set_aside(&a);
    assert_eq!(divergent.len(), 1, "{}", a.status());
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&divergent[0]).unwrap()).unwrap();
    let copy = report["copy"].as_str().unwrap().to_string();
    assert_eq!(titles(Path::new(&copy)), acked.len() as i64, "{report}");
    println!("divergent: {report}\nreplaced: {replaced:?}");
    let log = std::fs::read_to_string(a.status()["log_file"].as_str().unwrap()).unwrap();
    for r in &replaced {
        assert!(
            log.lines()
                .any(|l| l.contains("WARN") && l.contains(&format!("membridge merge {r}"))),
            "no WARN with the merge command for {r}:\n{log}"
        );
    }
    let out = a.run(&["status", a.dir.to_str().unwrap()]);
    assert!(
        text(&out).contains(&format!("membridge merge {copy}")),
        "{}",
        text(&out)
    );
    let out = a.run(&["doctor", a.dir.to_str().unwrap()]);
    let doc = text(&out);
    assert_eq!(out.status.code(), Some(4), "{doc}");
    assert!(
        doc.contains("[warn] divergent copy") && doc.contains(&format!("membridge merge {copy}")),
        "{doc}"
    );
    // The replaced copy is the same tail: acknowledged without importing.
    assert_eq!(replaced.len(), 1, "{}", a.status());
    let out = a.run(&["merge", "--dismiss", &replaced[0]]);
    assert!(
        out.status.success() && text(&out).contains("dismissed"),
        "{}",
        text(&out)
    );
    wait_for(
        "the dismissed copy to leave status",
        Duration::from_secs(10),
        || set_aside(&a).1.is_empty(),
    );
    let out = a.run(&["merge", &copy]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "a secondary merges nothing: {}",
        text(&out)
    );

    // Merged on the new primary: every commit A acknowledged is there.
    let out = b.run(&["merge", &divergent[0]]);
    let merged = text(&out);
    println!("{merged}");
    assert!(
        out.status.success() && merged.contains("marked merged"),
        "{merged}"
    );
    assert_eq!(titles(&bdb), acked.len() as i64, "{merged}");
    for p in ["published prompt about yaks", "tail prompt about zebus"] {
        assert_eq!(
            query(
                &bdb,
                &format!("SELECT count(*) FROM user_prompts WHERE prompt_text = '{p}'")
            ),
            1,
            "{p}"
        );
    }
    assert_eq!(
        query(
            &bdb,
            "SELECT count(*) FROM observations WHERE title = 'written on b'"
        ),
        1
    );
    assert_eq!(
        sqlite3(&bdb, "PRAGMA integrity_check").unwrap().trim(),
        "ok"
    );
    let out = b.run(&["merge", &copy]);
    assert!(text(&out).contains("imported 0 rows"), "{}", text(&out));

    // A's divergent copy clears by its mark.
    wait_for(
        "A's set-aside copies to clear",
        Duration::from_secs(40),
        || set_aside(&a) == (vec![], vec![]),
    );
    let out = a.run(&["doctor", a.dir.to_str().unwrap()]);
    let doc = text(&out);
    assert!(
        !doc.contains("[warn] divergent copy") && !doc.contains("[warn] set-aside copy"),
        "{doc}"
    );
    assert!(doc.contains("set-aside copies resolved"), "{doc}");
    let resolution = |c: &str| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(format!("{c}.resolved")).unwrap()).unwrap()
    };
    let r = resolution(&copy);
    assert_eq!(r["how"], "merged", "{r}");
    assert!(
        // Five tail memories and the tail prompt.
        r["detail"].as_str().unwrap().starts_with("6 rows imported"),
        "the first merge's mark stays: {r}"
    );
    for c in &replaced {
        let r = resolution(c);
        println!("{c}: {r}");
        assert_eq!(r["how"], "dismissed", "{r}");
    }
}
