//! Hand-over between two real mounts (issue 10): how long `membridge
//! leadership select NODE` takes to return, how long until NODE takes writes,
//! and the longest interval in which no node took a write.
//!
//! Two nodes on one SeaweedFS bucket, default TTL and poll. A writer on each
//! node tries a single-row transaction every 20 ms on a fresh connection (as a
//! hook would), so the primary is busy throughout (its backlog is never empty
//! at the hand-over: the worst case) and the new primary's first write is seen
//! within one attempt. `select` is run on the target node, alternately A→B and
//! B→A, `MEMBRIDGE_BENCH_HANDOVERS` times (default 10), over a database of
//! `MEMBRIDGE_BENCH_HANDOVER_MB` MB (default 1; promotion hashes and copies the
//! whole file, so its size counts).
//!
//! - `select`: the command's wall time.
//! - `writes`: from the command's start to the target's first committed write.
//! - `gap`: the old primary's last committed write to the new one's first.
//!
//! `cargo bench --bench handover`

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::mount::Mount;
use common::SeaweedFs;
use support::*;

/// Between two write attempts on one node.
const ATTEMPT_EVERY: Duration = Duration::from_millis(20);

/// Successful commits of one node, as instants.
type Commits = Arc<Mutex<Vec<Instant>>>;

fn main() {
    let wanted = positional_args();
    if !(wanted.is_empty() || wanted.iter().any(|w| "handover".contains(w.as_str()))) {
        return;
    }
    let rounds: usize = std::env::var("MEMBRIDGE_BENCH_HANDOVERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let size_mb: u64 = std::env::var("MEMBRIDGE_BENCH_HANDOVER_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    eprintln!(
        "handover: {rounds} hand-overs, {size_mb} MB database (load {})",
        load()
    );
    let s3 = SeaweedFs::start();
    let bucket = s3.new_bucket("bench-handover");
    let (seeded, _) = seeded_bytes(size_mb);
    let a = node(&s3, &bucket, "handover", "ho-a", &[(DB, &seeded)]);
    {
        let c = open(&a.dir.join(DB));
        c.execute_batch(
            "CREATE TABLE w2(id INTEGER PRIMARY KEY, node TEXT, at INTEGER);
             INSERT INTO w(v) VALUES ('start');",
        )
        .unwrap();
    }
    let head = wait_drained(&a, Duration::from_secs(60));
    let b = node(&s3, &bucket, "handover", "ho-b", &[]);
    wait_applied(&b, head, Duration::from_secs(60));

    let stop = Arc::new(AtomicBool::new(false));
    let (ca, cb): (Commits, Commits) = (Arc::default(), Arc::default());
    let writers = [
        spawn_writer(a.dir.join(DB), "ho-a", ca.clone(), stop.clone()),
        spawn_writer(b.dir.join(DB), "ho-b", cb.clone(), stop.clone()),
    ];
    let nodes = [(&a, "ho-a", &ca), (&b, "ho-b", &cb)];
    let (mut selects, mut writes, mut gaps) = (Vec::new(), Vec::new(), Vec::new());
    let mut lines = Vec::new();
    for round in 0..rounds {
        let (from, to) = if round % 2 == 0 {
            (nodes[0], nodes[1])
        } else {
            (nodes[1], nodes[0])
        };
        // Settled: `from` is primary and writing, `to` is a secondary.
        wait_for("the primary to write", Duration::from_secs(60), || {
            from.0.status()["role"] == "primary" && to.0.status()["role"] == "secondary"
        });
        std::thread::sleep(Duration::from_secs(2));
        let t0 = Instant::now();
        let out = to.0.run(&["leadership", "select", to.1]);
        let select = t0.elapsed();
        assert!(
            out.status.success(),
            "leadership select {}: {}{}",
            to.1,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        wait_for(
            "the new primary's first write",
            Duration::from_secs(60),
            || to.2.lock().unwrap().iter().any(|t| *t > t0),
        );
        let first = *to.2.lock().unwrap().iter().find(|t| **t > t0).unwrap();
        let last_old = from
            .2
            .lock()
            .unwrap()
            .iter()
            .filter(|t| **t < first)
            .max()
            .copied()
            .unwrap_or(t0);
        let (w, g) = (first - t0, first.saturating_duration_since(last_old));
        lines.push(format!(
            "  {} -> {}: select returned {:.2} s, first write on {} {:.2} s, no-writer gap {:.2} s",
            from.1,
            to.1,
            select.as_secs_f64(),
            to.1,
            w.as_secs_f64(),
            g.as_secs_f64()
        ));
        eprintln!("handover: {}", lines.last().unwrap().trim());
        selects.push(select);
        writes.push(w);
        gaps.push(g);
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    if std::env::var_os("MEMBRIDGE_BENCH_LOGS").is_some() {
        dump_logs(&[&a, &b]);
    }
    let stat = |v: &mut Vec<Duration>| {
        v.sort();
        format!(
            "p50 {:.2} s, max {:.2} s",
            quantile(v, 0.5).as_secs_f64(),
            v.last().copied().unwrap_or_default().as_secs_f64()
        )
    };
    let mut out = vec![
        format!(
            "{rounds} hand-overs between two mounts (`leadership select` run on the target), \
             {size_mb} MB database, a writer on each node trying a 1-row transaction every {} ms, \
             default TTL and poll",
            ATTEMPT_EVERY.as_millis()
        ),
        format!("select returns:                {}", stat(&mut selects)),
        format!(
            "select -> new primary writes:  {} (target < 2 s)",
            stat(&mut writes)
        ),
        format!(
            "no-writer gap:                 {} (target < 1 s)",
            stat(&mut gaps)
        ),
    ];
    out.extend(lines);
    report(&format!("handover-{size_mb}mb"), &out);
}

/// Tries one insert every [`ATTEMPT_EVERY`] on a fresh connection (a demoted
/// node's connection must not stay open) and notes each commit.
fn spawn_writer(
    db: PathBuf,
    name: &'static str,
    commits: Commits,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            if try_write(&db, name).is_ok() {
                commits.lock().unwrap().push(Instant::now());
            }
            std::thread::sleep(ATTEMPT_EVERY);
        }
    })
}

fn try_write(db: &Path, name: &str) -> rusqlite::Result<()> {
    let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE)?;
    c.busy_timeout(Duration::from_millis(200))?;
    c.execute(
        "INSERT INTO w2(node, at) VALUES (?1, strftime('%s','now'))",
        [name],
    )?;
    Ok(())
}

/// The daemons' log lines about roles, the lease and hand-overs (to see where
/// the time goes).
fn dump_logs(mounts: &[&Mount]) {
    for m in mounts {
        let path = m.status()["log_file"].as_str().unwrap_or("").to_string();
        let log = std::fs::read_to_string(&path).unwrap_or_default();
        eprintln!("=== {path}");
        for l in log.lines().filter(|l| {
            [
                "role changed",
                "lease",
                "hand",
                "epoch",
                "catching",
                "settl",
                "adopted",
                "take-over",
            ]
            .iter()
            .any(|k| l.contains(k))
        }) {
            eprintln!("{l}");
        }
    }
}
