//! Replication against its baselines, measured and printed (issue 7, items 3-6):
//!
//! - `lag`: commit on the primary -> visible to a reader on a secondary, over
//!   200 commits at random intervals (100-400 ms), default 1 s poll: p50/p99.
//! - `upload`: bytes stored in the bucket per single-row transaction against
//!   the old tool's push of the whole database (a `VACUUM INTO` copy uploaded
//!   whole, with its `.sha256`), for 10 MB and 100 MB databases.
//! - `first_query`: time to the first `SELECT count(*)` on a fresh secondary
//!   (mount over an empty dir) against downloading the whole 200 MB database
//!   first (GET of the old tool's object to a file, then open and count).
//! - `daemon`: CPU and memory of the primary's and a secondary's daemon, idle
//!   and under a 100 tx/s write load (10 s each).
//!
//! Every number is taken from real mounts and a real S3 server (SeaweedFS on
//! loopback); bytes are the sizes of the objects actually stored.
//!
//! `cargo bench --bench replication [-- lag upload first_query daemon]`

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;

use common::SeaweedFs;
use membridge::remote::{ObjectStore, PutMode, S3Options, S3Store};
use support::*;

const COMMITS: usize = 200;

/// A named part of this bench.
type Section = (&'static str, fn(&SeaweedFs));

fn main() {
    let wanted = positional_args();
    let run = |name: &str| wanted.is_empty() || wanted.iter().any(|w| name.contains(w.as_str()));
    let sections: [Section; 4] = [
        ("lag", lag),
        ("upload", upload),
        ("first_query", first_query),
        ("daemon", daemon),
    ];
    if !sections.iter().any(|(n, _)| run(n)) {
        return;
    }
    let s3 = SeaweedFs::start();
    for (name, f) in sections {
        if run(name) {
            eprintln!("replication: {name} (load {})", load());
            let t = Instant::now();
            f(&s3);
            eprintln!("replication: {name} took {:.0?}", t.elapsed());
        }
    }
}

fn store(s3: &SeaweedFs, bucket: &str, project: &str) -> S3Store {
    S3Store::new(&s3.config(bucket, project).s3, S3Options::default())
}

fn lag(s3: &SeaweedFs) {
    let bucket = s3.new_bucket("bench-lag");
    let a = node(s3, &bucket, "lag", "lag-primary", &[]);
    let pc = open(&a.dir.join(DB));
    pc.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;
         CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);",
    )
    .unwrap();
    let head = wait_drained(&a, Duration::from_secs(60));
    let b = node(s3, &bucket, "lag", "lag-secondary", &[]);
    wait_applied(&b, head, Duration::from_secs(60));

    // A reader on the secondary notes when each id first shows.
    let bdb = b.dir.join(DB);
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let done = done.clone();
        std::thread::spawn(move || {
            let c = open_ro(&bdb).unwrap();
            let mut seen = vec![None::<Instant>; COMMITS + 1];
            let mut max = 0usize;
            let limit = Instant::now() + Duration::from_secs(COMMITS as u64 + 60);
            while max < COMMITS && Instant::now() < limit {
                let m: i64 = c
                    .query_row("SELECT coalesce(max(id), 0) FROM t", [], |r| r.get(0))
                    .unwrap_or(0);
                let now = Instant::now();
                for s in seen.iter_mut().take(m as usize + 1).skip(max + 1) {
                    *s = Some(now);
                }
                max = max.max(m as usize);
                if done.load(Ordering::Relaxed) && max >= COMMITS {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            seen
        })
    };
    let mut committed = vec![None::<Instant>; COMMITS + 1];
    let mut rng = rand::thread_rng();
    let mut ins = pc.prepare("INSERT INTO t(id, v) VALUES (?1, ?2)").unwrap();
    for (i, slot) in committed.iter_mut().enumerate().skip(1) {
        std::thread::sleep(Duration::from_millis(rng.gen_range(100..=400)));
        ins.execute(rusqlite::params![i as i64, "an observation"])
            .unwrap();
        *slot = Some(Instant::now());
    }
    done.store(true, Ordering::Relaxed);
    let seen = reader.join().unwrap();
    let mut lags: Vec<Duration> = (1..=COMMITS)
        .filter_map(|i| Some(seen[i]?.saturating_duration_since(committed[i]?)))
        .collect();
    let missing = COMMITS - lags.len();
    lags.sort();
    let (p50, p99) = (quantile(&lags, 0.5), quantile(&lags, 0.99));
    let mean = lags.iter().sum::<Duration>() / lags.len().max(1) as u32;
    let poll = "default poll (1 s)";
    report(
        "lag",
        &[
            format!("{COMMITS} single-row commits at random 100-400 ms intervals, {poll}; a reader on the secondary polls every 5 ms"),
            format!(
                "commit -> visible on the secondary: p50 {:.2} s (< 1.5 s: {}), p99 {:.2} s (< 2.5 s: {}), mean {:.2} s, max {:.2} s{}",
                p50.as_secs_f64(),
                verdict(p50 < Duration::from_millis(1500)),
                p99.as_secs_f64(),
                verdict(p99 < Duration::from_millis(2500)),
                mean.as_secs_f64(),
                lags.last().copied().unwrap_or_default().as_secs_f64(),
                if missing > 0 { format!(", {missing} never seen") } else { String::new() }
            ),
        ],
    );
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "ok"
    } else {
        "MISSED"
    }
}

/// key -> (size, etag) of every object under `projects/`.
fn objects(st: &S3Store) -> BTreeMap<String, (u64, String)> {
    common::block_on(st.list("projects/"))
        .unwrap()
        .into_iter()
        .map(|o| (o.key, (o.size, o.etag)))
        .collect()
}

/// Bytes of the objects that are new or rewritten in `after`: (all, segments only).
fn stored_since(
    before: &BTreeMap<String, (u64, String)>,
    after: &BTreeMap<String, (u64, String)>,
) -> (u64, u64, Vec<String>) {
    let mut all = 0;
    let mut seg = 0;
    let mut keys = Vec::new();
    for (k, (size, etag)) in after {
        if before.get(k).map(|(_, e)| e) != Some(etag) {
            all += size;
            if k.ends_with(".seg") {
                seg += size;
            }
            keys.push(k.rsplit('/').next().unwrap_or(k).to_string());
        }
    }
    (all, seg, keys)
}

fn upload(s3: &SeaweedFs) {
    let mut lines = vec![
        "per transaction: the objects new or rewritten in the bucket by one single-row insert (segment, manifest.json, any heartbeat); median of 10".to_string(),
        format!("{:<8} {:>12} {:>14} {:>14} {:>12}", "db", "old push", "membridge/tx", "segment/tx", "ratio"),
    ];
    for size in [10u64, 100] {
        let project = format!("upload-{size}");
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join(DB);
        seed(&src, size);

        // The old tool's push: VACUUM INTO a copy, upload it whole with its .sha256.
        let old_bucket = s3.new_bucket(&format!("bench-old-{size}"));
        let old = store(s3, &old_bucket, &project);
        let layout = s3.config(&old_bucket, &project).layout();
        let t = Instant::now();
        let copy = tmp.path().join("push.db");
        open(&src)
            .execute("VACUUM INTO ?1", [copy.to_str().unwrap()])
            .unwrap();
        let body = std::fs::read(&copy).unwrap();
        let sha = {
            use sha2::Digest;
            hex::encode(sha2::Sha256::digest(&body))
        };
        common::block_on(async {
            old.put(&layout.legacy_db(), body.into(), PutMode::Overwrite)
                .await
                .unwrap();
            old.put(
                &layout.legacy_sha256(),
                format!("{sha}  {DB}\n").into_bytes().into(),
                PutMode::Overwrite,
            )
            .await
            .unwrap();
        });
        let old_secs = t.elapsed().as_secs_f64();
        let old_bytes: u64 = objects(&old).values().map(|(s, _)| s).sum();

        // membridge: a primary over the same database; one small transaction at a time.
        let bucket = s3.new_bucket(&format!("bench-up-{size}"));
        let st = store(s3, &bucket, &project);
        let bytes = std::fs::read(&src).unwrap();
        let m = node(s3, &bucket, &project, "upload-primary", &[(DB, &bytes)]);
        wait_drained(&m, Duration::from_secs(300));
        let c = open(&m.dir.join(DB));
        c.execute_batch("PRAGMA synchronous=NORMAL").unwrap();
        let mut per_tx = Vec::new();
        let mut per_seg = Vec::new();
        let mut names = Vec::new();
        for i in 0..10 {
            let before = objects(&st);
            c.execute(
                "INSERT INTO w(v) VALUES (?1)",
                [format!("small observation {i}")],
            )
            .unwrap();
            wait_drained(&m, Duration::from_secs(60));
            let (all, seg, keys) = stored_since(&before, &objects(&st));
            per_tx.push(all);
            per_seg.push(seg);
            names = keys;
        }
        per_tx.sort();
        per_seg.sort();
        let (tx, seg) = (per_tx[per_tx.len() / 2], per_seg[per_seg.len() / 2]);
        lines.push(format!(
            "{:<8} {:>12} {:>14} {:>14} {:>11.0}x",
            format!("{size} MB"),
            mb(old_bytes),
            format!("{tx} B"),
            format!("{seg} B"),
            old_bytes as f64 / tx.max(1) as f64
        ));
        lines.push(format!(
            "         (old push took {old_secs:.1} s; the last transaction stored: {})",
            names.join(", ")
        ));
    }
    report("upload", &lines);
}

fn first_query(s3: &SeaweedFs) {
    const SIZE: u64 = 200;
    let bucket = s3.new_bucket("bench-first");
    let project = "first-query";
    let (bytes, rows) = seeded_bytes(SIZE);
    let db_len = bytes.len() as u64;
    let a = node(s3, &bucket, project, "first-primary", &[(DB, &bytes)]);
    drop(bytes);
    wait_drained(&a, Duration::from_secs(600));
    let st = store(s3, &bucket, project);
    let layout = s3.config(&bucket, project).layout();
    wait_for("the legacy object", Duration::from_secs(300), || {
        objects(&st).contains_key(&layout.legacy_db())
    });

    // Baseline: download the whole database, then open it.
    let tmp = tempfile::tempdir().unwrap();
    let t = Instant::now();
    let got = common::block_on(st.get(&layout.legacy_db())).unwrap();
    std::fs::write(tmp.path().join(DB), &got.body).unwrap();
    let n = count(&open_ro(&tmp.path().join(DB)).unwrap()).unwrap();
    let download = t.elapsed();
    assert_eq!(n, rows);
    drop(got);

    // membridge: mount a fresh secondary over an empty dir, query until answered.
    let started = chrono::Utc::now();
    let t = Instant::now();
    let b = node(s3, &bucket, project, "first-secondary", &[]);
    let mounted = t.elapsed();
    let p = b.dir.join(DB);
    let answered = wait_for("the first query", Duration::from_secs(600), || {
        open_ro(&p).and_then(|c| count(&c)).ok() == Some(rows)
    }) + mounted;
    // Where the time went, from the daemon's own log.
    let rebuilt = match logged_at(&b, "local copy rebuilt from the bucket") {
        Some(at) => format!(
            "  (the daemon logged a full bootstrap done at {:.2} s)",
            (at - started).num_milliseconds() as f64 / 1000.0
        ),
        None => "  (no full bootstrap logged before the answer: served by read-through)".into(),
    };
    report(
        "first_query",
        &[
            format!("{} database ({rows} rows), fresh secondary over an empty dir", mb(db_len)),
            format!(
                "download whole db then query: {:.2} s; membridge mount returned after {:.2} s, first SELECT count(*) answered after {:.2} s; ratio {:.2}x",
                download.as_secs_f64(),
                mounted.as_secs_f64(),
                answered.as_secs_f64(),
                download.as_secs_f64() / answered.as_secs_f64()
            ),
            rebuilt,
        ],
    );
}

/// When the daemon of `m` first logged a line containing `what`.
fn logged_at(m: &common::mount::Mount, what: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    let log = std::fs::read_to_string(m.status()["log_file"].as_str()?).ok()?;
    let line = log.lines().find(|l| l.contains(what))?;
    let stamp = line.split_whitespace().next()?;
    chrono::DateTime::parse_from_rfc3339(stamp)
        .ok()
        .map(|t| t.with_timezone(&chrono::Utc))
}

/// CPU (% of one core) and memory of `pids` over `window` while `work` runs.
fn sample(pids: &[(&str, i32)], window: Duration, work: impl FnOnce(Duration)) -> Vec<String> {
    let before: Vec<_> = pids.iter().map(|(_, p)| proc_stats(*p)).collect();
    let t = Instant::now();
    work(window);
    let secs = t.elapsed().as_secs_f64();
    let hz = clock_ticks() as f64;
    pids.iter()
        .zip(before)
        .map(|((name, pid), (t0, _, _))| {
            let (t1, rss, hwm) = proc_stats(*pid);
            format!(
                "{name:<10} CPU {:>5.1}% of one core, VmRSS {:>6.1} MB, VmHWM {:>6.1} MB",
                (t1 - t0) as f64 / hz / secs * 100.0,
                rss as f64 / 1024.0,
                hwm as f64 / 1024.0
            )
        })
        .collect()
}

fn daemon(s3: &SeaweedFs) {
    const WINDOW: Duration = Duration::from_secs(10);
    let bucket = s3.new_bucket("bench-daemon");
    let (bytes, _) = seeded_bytes(10);
    let a = node(s3, &bucket, "daemon", "daemon-primary", &[(DB, &bytes)]);
    let head = wait_drained(&a, Duration::from_secs(120));
    let b = node(s3, &bucket, "daemon", "daemon-second", &[]);
    wait_applied(&b, head, Duration::from_secs(120));
    let pids = [("primary", a.pid()), ("secondary", b.pid())];
    std::thread::sleep(Duration::from_secs(2));
    let mut lines = vec![format!("a 10 MB database; each window {WINDOW:?}")];
    lines.push("idle:".into());
    lines.extend(sample(&pids, WINDOW, std::thread::sleep));
    let c = open(&a.dir.join(DB));
    c.execute_batch("PRAGMA synchronous=NORMAL").unwrap();
    let mut ins = c.prepare("INSERT INTO w(v) VALUES (?1)").unwrap();
    let mut done = 0u64;
    let load = sample(&pids, WINDOW, |w| {
        let t = Instant::now();
        while t.elapsed() < w {
            done += 1;
            ins.execute([format!("observation {done}")]).unwrap();
            // Paced at 100 tx/s from the start, so a slow commit is caught up.
            let next = Duration::from_millis(10 * done);
            if let Some(d) = next.checked_sub(t.elapsed()) {
                std::thread::sleep(d);
            }
        }
    });
    lines.push(format!(
        "under {:.0} tx/s of single-row inserts:",
        done as f64 / WINDOW.as_secs_f64()
    ));
    lines.extend(load);
    // The secondary really followed that load (it applies once a poll).
    let head = wait_drained(&a, Duration::from_secs(60));
    let t = Instant::now();
    wait_applied(&b, head, Duration::from_secs(60));
    lines.push(format!(
        "the secondary applied the last of {done} transactions {:.1} s after the load ended",
        t.elapsed().as_secs_f64()
    ));
    report("daemon", &lines);
}
