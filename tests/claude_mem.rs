//! The real-client tier (issue 10): claude-mem 13.25.3's own worker, run by Bun
//! as its plugin runs it, on membridge mounts, driven through its hooks (JSON on
//! stdin, as hooks.json does) and its HTTP API. No API key is involved: sessions,
//! prompts, tool observations, memory saves, imports, search and context
//! injection all work without the model.
//!
//! Needs Bun and claude-mem from `scripts/install-deps.sh` (`.ci/run` installs
//! them); without them every test here fails saying so.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::claude_mem::{database_backups, median, sqlite3, Client, HookRun, Worker, PROJECT};
use common::mount::Mount;
use common::SeaweedFs;
use common::{node, wait_for};

const DB: &str = "claude-mem.db";
/// claude-mem's one-time migration markers (see /work/notes/claude-mem-datadir.md).
const MARKERS: [&str; 2] = [".cwd-remap-applied-v1", ".cleanup-v12.4.3-applied"];

/// Two nodes on one bucket with a short lease, so failover fits the suite.
fn bucket_env(tag: &str) -> Vec<(String, String)> {
    let s3 = SeaweedFs::shared();
    let mut env = s3.env(&s3.new_bucket(tag), tag);
    env.push(("LEADERSHIP_LEASE_SECONDS".into(), "6".into()));
    env
}

/// Hook latencies by the role of the node that ran them.
#[derive(Default)]
struct Latencies {
    primary: Vec<Duration>,
    secondary: Vec<Duration>,
}

impl Latencies {
    fn record(&mut self, primary: bool, runs: &[HookRun]) {
        let to = if primary {
            &mut self.primary
        } else {
            &mut self.secondary
        };
        to.extend(runs.iter().map(|r| r.elapsed));
    }

    /// Secondary hooks within 1.5× the primary's (medians: each hook is a
    /// node + Bun start, so single runs are noisy on a busy 2-core box).
    fn check(&self) {
        let (p, s) = (median(&self.primary), median(&self.secondary));
        println!(
            "hook latency median: primary {p:?} ({} runs), secondary {s:?} ({} runs)",
            self.primary.len(),
            self.secondary.len()
        );
        assert!(
            s.as_secs_f64() <= 1.5 * p.as_secs_f64(),
            "hooks on a secondary take {s:?} (median), over 1.5× the primary's {p:?}"
        );
    }
}

/// Every hook of a session exits 0 and SessionStart injects context (the
/// project's memory, or claude-mem's welcome text while it has none).
fn check_session(w: &Worker, runs: &[HookRun]) {
    for r in runs {
        assert_eq!(
            r.code,
            Some(0),
            "{}: hook {} failed: {r:?}\n{}",
            w.name,
            r.event,
            w.log_tail(30)
        );
    }
    let ctx = runs
        .iter()
        .find(|r| r.event == "context")
        .and_then(HookRun::additional_context)
        .unwrap_or_default();
    assert!(
        !ctx.trim().is_empty(),
        "{}: SessionStart injected no context: {runs:?}",
        w.name
    );
    println!(
        "{}: {}",
        w.name,
        runs.iter()
            .map(|r| format!("{} {:.0?}", r.event, r.elapsed))
            .collect::<Vec<_>>()
            .join(", ")
    );
}

/// A save on a secondary fails with SQLite's error for a refused write: in
/// WAL mode the refusal of the first frame reads "disk I/O error" (README,
/// "Writing on a secondary"), a rollback journal's reads "readonly".
fn refused(w: &Worker, title: &str) {
    let (status, body) = w.save_memory(title, "written on a secondary");
    assert!(
        status != 200 && (body.contains("disk I/O error") || body.contains("readonly")),
        "{}: a save on a secondary answered {status} {body} (want SQLite's refused-write error)",
        w.name
    );
}

/// Retries a save until the worker takes it: how long that took.
fn saved_within(w: &Worker, title: &str, limit: Duration) -> Duration {
    let t = Instant::now();
    loop {
        let (status, body) = w.save_memory(title, &format!("{title}: written after promotion"));
        if status == 200 {
            return t.elapsed();
        }
        assert!(
            t.elapsed() < limit,
            "{}: the promoted node's worker still refuses writes after {limit:?}: {status} {body}\n{}",
            w.name,
            w.log_tail(30)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// How long until `w`'s search (its long-lived connection) finds `needle`.
fn found_within(w: &Worker, needle: &str, limit: Duration) -> Duration {
    let t = Instant::now();
    loop {
        let (status, body) = w.search(needle);
        if status == 200 && body.contains(needle) {
            return t.elapsed();
        }
        assert!(
            t.elapsed() < limit,
            "{}: search for {needle:?} found nothing within {limit:?}: {status} {body}\n{}",
            w.name,
            w.log_tail(30)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn prompts(db: &Path, text: &str) -> i64 {
    sqlite3(
        db,
        &format!("SELECT count(*) FROM user_prompts WHERE prompt_text = '{text}'"),
    )
    .unwrap_or_else(|e| panic!("{e}"))
    .trim()
    .parse()
    .unwrap()
}

/// The two nodes' `.dump`s (sqlite3 CLI) become identical.
fn dumps_converge(a: &Mount, b: &Mount, limit: Duration) {
    let (adb, bdb) = (a.dir.join(DB), b.dir.join(DB));
    let t = Instant::now();
    loop {
        let (da, db) = (sqlite3(&adb, ".dump"), sqlite3(&bdb, ".dump"));
        if let (Ok(x), Ok(y)) = (&da, &db) {
            if x == y {
                for p in [&adb, &bdb] {
                    assert_eq!(sqlite3(p, "PRAGMA integrity_check").unwrap().trim(), "ok");
                }
                return;
            }
        }
        if t.elapsed() > limit {
            let first_diff = match (&da, &db) {
                (Ok(x), Ok(y)) => x
                    .lines()
                    .zip(y.lines())
                    .find(|(l, r)| l != r)
                    .map(|(l, r)| format!("first difference:\n  A: {l:.300}\n  B: {r:.300}"))
                    .unwrap_or_else(|| {
                        format!("{} vs {} lines", x.lines().count(), y.lines().count())
                    }),
                _ => format!("A: {:?}\nB: {:?}", da.err(), db.err()),
            };
            panic!("the nodes' dumps differ after {limit:?}; {first_diff}");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn no_sqlite_errors(w: &Worker, allow_readonly: bool) {
    let errors = w.sqlite_errors(None, None, allow_readonly);
    assert!(
        errors.is_empty(),
        "{}: SQLite errors in claude-mem's log:\n{}",
        w.name,
        errors.join("\n")
    );
}

/// A role change has settled on both nodes.
fn roles(primary: &Mount, secondary: &Mount) {
    wait_for("the new primary", Duration::from_secs(30), || {
        primary.status()["role"] == "primary"
    });
    wait_for(
        "the old primary to serve as a secondary",
        Duration::from_secs(30),
        || secondary.status()["role"] == "secondary",
    );
}

/// The second node's worker starts once it holds the primary's database, and
/// the markers claude-mem wrote there if membridge replicates them.
fn start_second_worker(client: &Client, a: &Mount, b: &Mount) -> Worker {
    dumps_converge(a, b, Duration::from_secs(30));
    let markers = Instant::now();
    while markers.elapsed() < Duration::from_secs(5)
        && !MARKERS.iter().all(|m| b.dir.join(m).exists())
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    let wb = Worker::start(client, "node-b", &b.dir);
    wb.wait_initialized(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
    wb
}

#[test]
fn the_primarys_worker_serves_sessions_saves_search_and_context_without_sqlite_errors() {
    let client = Client::find();
    let env = bucket_env("cm-primary");
    let a = node(&env, "node-a");
    assert_eq!(a.status()["role"], "primary");
    let b = node(&env, "node-b");
    let wa = Worker::start(&client, "node-a", &a.dir);
    let took = wa
        .wait_initialized(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
    println!("node-a: worker initialized {took:?} after `start` returned");
    for m in MARKERS {
        assert!(a.dir.join(m).is_file(), "claude-mem wrote no {m}");
    }
    // A first start on an empty data dir makes one VACUUM INTO copy in
    // backups/ (its v12.4.3 clean-up); nothing may add to it later.
    let first_backups = wa.backups();
    assert!(
        first_backups.len() <= 1 && first_backups.iter().all(|b| b.starts_with("backups/")),
        "{first_backups:?}"
    );
    let mut lat = Latencies::default();
    let runs = wa.session("sess-a1", "Explain the frobnicator cache");
    check_session(&wa, &runs);
    lat.record(true, &runs);
    assert_eq!(prompts(&a.dir.join(DB), "Explain the frobnicator cache"), 1);
    let t = Instant::now();
    for i in 0..20 {
        wa.saved(&format!("frobnicator note {i}"));
    }
    println!("node-a: 20 memory saves in {:?}", t.elapsed());
    let (status, body) = wa.import_session("a1", "Frobnicator ring buffer from node-a");
    assert!(
        status == 200 && body.contains("\"observationsImported\":1"),
        "{status} {body}"
    );
    found_within(&wa, "frobnicator note 19", Duration::ZERO);
    found_within(&wa, "Frobnicator ring buffer from node-a", Duration::ZERO);
    let (status, ctx) = wa.context();
    assert!(
        status == 200 && ctx.contains("Frobnicator ring buffer from node-a"),
        "{status} {ctx}"
    );
    let runs = wa.session("sess-a2", "Now make the frobnicator faster");
    check_session(&wa, &runs);
    lat.record(true, &runs);
    let injected = runs.iter().find_map(HookRun::additional_context).unwrap();
    assert!(
        injected.contains(PROJECT) && injected.contains("Frobnicator ring buffer from node-a"),
        "{injected}"
    );
    // Restart (as membridge may do at a role change) and stop, through
    // claude-mem's own lifecycle commands.
    let old = wa.pid();
    let r = wa.lifecycle("restart");
    assert_eq!(r.code, Some(0), "{r:?}\n{}", wa.log_tail(30));
    wa.wait_initialized(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("after restart: {e}"));
    assert_ne!(wa.pid(), old, "restart kept the same process");
    println!("node-a: `restart` took {:?}", r.elapsed);
    // The restarted worker opened an existing WAL database: the kernel serves
    // it, and its commits are tailed from the WAL (issue 12).
    assert_eq!(
        a.status()["io"]["databases"][DB],
        "kernel",
        "{}",
        a.log_tail(20)
    );
    wa.saved("after restart");
    let r = wa.lifecycle("stop");
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(
        wa.health().is_err(),
        "the worker still answers after `stop`"
    );
    assert!(a.dir.join(".worker-clean-shutdown").is_file());
    assert_eq!(wa.backups(), first_backups, "a restart copied the database");
    no_sqlite_errors(&wa, false);
    // The real client's schema (FTS5 tables, triggers) replicates whole.
    dumps_converge(&a, &b, Duration::from_secs(30));
    assert!(database_backups(&b.dir).is_empty());
    println!(
        "node-a: hook latency median {:?} over {} runs",
        median(&lat.primary),
        lat.primary.len()
    );
}

#[test]
fn both_workers_run_through_hand_over_both_ways() {
    let client = Client::find();
    let env = bucket_env("cm-handover");
    let a = node(&env, "node-a");
    assert_eq!(a.status()["role"], "primary");
    let b = node(&env, "node-b");
    let wa = Worker::start(&client, "node-a", &a.dir);
    wa.wait_initialized(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
    let (status, body) = wa.import_session("a0", "Frobnicator ring buffer from node-a");
    assert_eq!(status, 200, "{body}");
    let a_backups = wa.backups();
    let wb = start_second_worker(&client, &a, &b);
    let mut lat = Latencies::default();

    // Phase 1: A writes, B reads what A writes, through its open connection.
    for (w, primary, sid) in [(&wa, true, "p1-a"), (&wb, false, "p1-b")] {
        let runs = w.session(sid, &format!("phase one on {}", w.name));
        check_session(w, &runs);
        lat.record(primary, &runs);
    }
    assert_eq!(prompts(&a.dir.join(DB), "phase one on node-a"), 1);
    wa.saved("alpha from node-a");
    refused(&wb, "alpha from node-b");
    let seen = found_within(&wb, "alpha from node-a", Duration::from_secs(10));
    println!("node-b's worker found node-a's save after {seen:?}");
    let (status, ctx) = wb.context();
    assert!(
        status == 200 && ctx.contains("Frobnicator ring buffer from node-a"),
        "{status} {ctx}"
    );
    dumps_converge(&a, &b, Duration::from_secs(20));

    // Phase 2: hand-over to B with both workers running.
    for (to, from, wto, wfrom, word) in [(&b, &a, &wb, &wa, "beta"), (&a, &b, &wa, &wb, "gamma")] {
        let id = wto.name.as_str();
        let t = Instant::now();
        let out = to.run(&["leadership", "select", id]);
        assert!(
            out.status.success(),
            "leadership select {id}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let select = t.elapsed();
        roles(to, from);
        let title = format!("{word} from {id}");
        saved_within(wto, &title, Duration::from_secs(15));
        println!(
            "hand-over to {id}: `leadership select` returned after {select:?}; its worker took a write {:?} after the command",
            t.elapsed()
        );
        refused(wfrom, &format!("{word} from {}", wfrom.name));
        for (w, primary) in [(wto, true), (wfrom, false)] {
            let prompt = format!("{word} session on {}", w.name);
            let runs = w.session(&format!("{word}-{}", w.name), &prompt);
            check_session(w, &runs);
            lat.record(primary, &runs);
        }
        assert_eq!(
            prompts(&to.dir.join(DB), &format!("{word} session on {id}")),
            1
        );
        let seen = found_within(wfrom, &title, Duration::from_secs(10));
        println!("{}'s worker found {id}'s save after {seen:?}", wfrom.name);
        dumps_converge(to, from, Duration::from_secs(20));
    }

    no_sqlite_errors(&wa, true);
    no_sqlite_errors(&wb, true);
    no_database_copies(&wa, &a_backups, &wb);
    lat.check();
}

/// claude-mem copies its database aside (`.bak-*`) when it finds it changed
/// under it; node-a's first worker may have made its own before the test.
fn no_database_copies(wa: &Worker, a_backups: &[String], wb: &Worker) {
    assert_eq!(
        wa.backups(),
        a_backups,
        "node-a's worker copied the database"
    );
    assert!(
        wb.backups().is_empty(),
        "node-b's worker copied the database: {:?}",
        wb.backups()
    );
}

#[test]
fn kill_9_of_the_primarys_daemon_fails_over_and_both_workers_recover() {
    let client = Client::find();
    let env = bucket_env("cm-failover");
    let a = node(&env, "node-a");
    assert_eq!(a.status()["role"], "primary");
    let b = node(&env, "node-b");
    let wa = Worker::start(&client, "node-a", &a.dir);
    wa.wait_initialized(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
    let a_backups = wa.backups();
    let wb = start_second_worker(&client, &a, &b);
    let mut lat = Latencies::default();
    wa.saved("before the crash");
    found_within(&wb, "before the crash", Duration::from_secs(10));

    // The primary's daemon dies; its mount answers ENOTCONN until remounted.
    let dead = wa.log_mark();
    let pid = nix::unistd::Pid::from_raw(a.pid());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
    let t = Instant::now();
    wait_for("node-b to take over", Duration::from_secs(30), || {
        b.status()["role"] == "primary"
    });
    let took = saved_within(&wb, "after the failover", Duration::from_secs(15));
    println!(
        "kill -9: node-b primary and its worker writing {:?} after the kill ({took:?} after promotion)",
        t.elapsed()
    );
    let runs = wb.session("fo-b", "failover session on node-b");
    check_session(&wb, &runs);
    lat.record(true, &runs);
    assert_eq!(prompts(&b.dir.join(DB), "failover session on node-b"), 1);
    found_within(&wb, "before the crash", Duration::ZERO);

    // The node comes back (as its service manager would remount it); the
    // user's next session there starts with claude-mem's SessionStart hooks.
    a.mount();
    assert_eq!(a.status()["role"], "secondary");
    let runs = wa.session("fo-a", "back on node-a");
    check_session(&wa, &runs);
    lat.record(false, &runs);
    let seen = found_within(&wa, "after the failover", Duration::from_secs(30));
    println!("node-a's worker found node-b's post-failover save {seen:?} after the remount's first session");
    let recovered = wa.log_mark();
    refused(&wa, "on node-a after the failover");
    dumps_converge(&b, &a, Duration::from_secs(20));

    // While node-a's mount was dead its worker could only fail; before the
    // crash and after recovery, nothing but readonly refusals.
    let mut errors = wa.sqlite_errors(None, Some(&dead), true);
    errors.extend(wa.sqlite_errors(Some(&recovered), None, true));
    assert!(
        errors.is_empty(),
        "node-a: SQLite errors in claude-mem's log:\n{}",
        errors.join("\n")
    );
    no_sqlite_errors(&wb, true);
    no_database_copies(&wa, &a_backups, &wb);
    lat.check();
}

/// The log check finds what claude-mem 13.25.3 really logs (lines taken from
/// its log on a secondary) and lets only a secondary's refused writes through.
#[test]
fn the_log_check_tells_refused_writes_from_failures() {
    use common::claude_mem::sqlite_error_lines;
    let log = "\
[2026-12-03 09:52:34.664] [WARN ] [DB    ] Failed to apply SQLite pragma journal_mode {sql=PRAGMA journal_mode = WAL} attempt to write a readonly database
[2026-12-03 09:52:34.671] [ERROR] [SYSTEM] Background initialization failed attempt to write a readonly database
[2026-12-03 09:31:34.104] [WARN ] [SYSTEM] Worker API POST /api/sessions/init returned 500; skipping hook API call {body={\"error\":\"attempt to write a readonly database\"}}
SQLiteError: attempt to write a readonly database
[2026-12-03 09:52:05.417] [ERROR] [WORKER] ✗ Request failed disk I/O error
[2026-12-03 09:30:23.151] [INFO ] [DB    ] Database initialized (shared connection)";
    let strict = sqlite_error_lines(log, false);
    assert_eq!(strict.len(), 5, "{strict:#?}");
    let lenient = sqlite_error_lines(log, true);
    assert_eq!(lenient.len(), 2, "{lenient:#?}");
    assert!(lenient[0].contains("Failed to apply SQLite pragma"));
    assert!(lenient[1].contains("Background initialization failed"));
}
