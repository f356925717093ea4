//! SQLite through the mount against the bare directory, in one run (issue 7,
//! items 1 and 2):
//!
//! - `write_tx`: single-row insert transactions (WAL, `synchronous=NORMAL`) on
//!   the bare directory and through the primary's mount.
//!   `write_tx/primary_local` writes a copy of the database at a local (not
//!   replicated) path of the same mount: kernel passthrough where available
//!   (docs/ARCHITECTURE.md, "Passthrough"). `write_tx/local_daemon` does the
//!   same on a mount with `MEMBRIDGE_PASSTHROUGH=off`: every write a FUSE
//!   round trip through the daemon, without capture.
//! - `point_query` and `full_scan`: hot reads of a 50 MB database on the bare
//!   directory, through the primary's mount and through a hydrated secondary.
//!
//! One SeaweedFS, one primary, one secondary and one bare copy of the same
//! database are set up first; criterion then measures each function, and the
//! ratios to the bare directory (from criterion's medians) are printed and
//! written to `target/membridge-bench/io.txt`.
//!
//! `cargo bench --bench io [-- FILTER]`

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput};
use rand::Rng;

use common::mount::Mount;
use common::SeaweedFs;
use support::*;

/// Size of the read database.
const READ_MB: u64 = 50;
/// A copy of the database on the primary's mount at a path that is not
/// replicated: FUSE passthrough alone, without capture.
const LOCAL_DB: &str = "bench-local.db";

struct Setup {
    _s3: SeaweedFs,
    bare: tempfile::TempDir,
    primary: Mount,
    secondary: Mount,
    /// A primary of its own bucket with passthrough off, for `local_daemon`.
    no_passthrough: Mount,
    rows: i64,
}

impl Setup {
    fn new() -> Setup {
        eprintln!("io: starting SeaweedFS, seeding a {READ_MB} MB database, mounting a primary and a secondary");
        let s3 = SeaweedFs::start();
        let (bytes, rows) = seeded_bytes(READ_MB);
        let bare = tempfile::tempdir().unwrap();
        std::fs::write(bare.path().join(DB), &bytes).unwrap();
        let bucket = s3.new_bucket("bench-io");
        let primary = node(
            &s3,
            &bucket,
            "bench-io",
            "bench-primary",
            &[(DB, &bytes), (LOCAL_DB, &bytes)],
        );
        assert_eq!(primary.status()["role"], "primary");
        let head = wait_drained(&primary, Duration::from_secs(300));
        let secondary = node(&s3, &bucket, "bench-io", "bench-secondary", &[]);
        assert_eq!(secondary.status()["role"], "secondary");
        wait_applied(&secondary, head, Duration::from_secs(300));
        let mut env = node_env(
            &s3,
            &s3.new_bucket("bench-io-off"),
            "bench-io-off",
            "bench-off",
        );
        env.push(("MEMBRIDGE_PASSTHROUGH".into(), "off".into()));
        let no_passthrough = Mount::with_files(env, &[(LOCAL_DB, &bytes)]);
        for (m, want) in [
            (&primary, "on"),
            (&secondary, "on"),
            (&no_passthrough, "off"),
        ] {
            let io = m.status()["io"].clone();
            if io["passthrough"] != want {
                eprintln!("io: passthrough is not {want} on {}: {io}", m.dir.display());
            }
        }
        // For profiling a run: `perf record -g -p PID`.
        eprintln!(
            "io: primary daemon pid {}, secondary daemon pid {}, bench pid {}",
            primary.pid(),
            secondary.pid(),
            std::process::id()
        );
        Setup {
            _s3: s3,
            bare,
            primary,
            secondary,
            no_passthrough,
            rows,
        }
    }

    fn db(&self, place: &str) -> PathBuf {
        match place {
            "bare" => self.bare.path().join(DB),
            "primary" => self.primary.dir.join(DB),
            "primary_local" => self.primary.dir.join(LOCAL_DB),
            "local_daemon" => self.no_passthrough.dir.join(LOCAL_DB),
            "secondary" => self.secondary.dir.join(DB),
            _ => unreachable!(),
        }
    }

    /// Lets the secondary apply whatever the write bench committed, so that the
    /// reads measure reads, not a catch-up.
    fn settle(&self) {
        let head = wait_drained(&self.primary, Duration::from_secs(120));
        wait_applied(&self.secondary, head, Duration::from_secs(120));
    }
}

/// `group/function` of each benchmark that ran (the others keep old estimates).
type Ran = RefCell<Vec<String>>;

const IDS: [&str; 10] = [
    "write_tx/bare",
    "write_tx/primary",
    "write_tx/primary_local",
    "write_tx/local_daemon",
    "point_query/bare",
    "point_query/primary",
    "point_query/secondary",
    "full_scan/bare",
    "full_scan/primary",
    "full_scan/secondary",
];

fn write_tx(c: &mut Criterion, s: &Setup, ran: &Ran) {
    const GROUP: &str = "write_tx";
    let mut g = c.benchmark_group(GROUP);
    g.throughput(Throughput::Elements(1));
    for place in ["bare", "primary", "primary_local", "local_daemon"] {
        let conn = open(&s.db(place));
        conn.execute_batch("PRAGMA synchronous=NORMAL").unwrap();
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let mut stmt = conn.prepare("INSERT INTO w(v) VALUES (?1)").unwrap();
        g.bench_function(BenchmarkId::from_parameter(place), |b| {
            ran.borrow_mut().push(format!("{GROUP}/{place}"));
            b.iter(|| stmt.execute(["a small observation, one row"]).unwrap())
        });
    }
    g.finish();
}

fn reads(c: &mut Criterion, s: &Setup, ran: &Ran) {
    s.settle();
    let rows = s.rows;
    const GROUP: &str = "point_query";
    let mut g = c.benchmark_group(GROUP);
    for place in ["bare", "primary", "secondary"] {
        let conn = open(&s.db(place));
        let mut stmt = conn.prepare("SELECT k, v FROM t WHERE id = ?1").unwrap();
        let mut rng = rand::thread_rng();
        g.bench_function(BenchmarkId::from_parameter(place), |b| {
            ran.borrow_mut().push(format!("{GROUP}/{place}"));
            b.iter(|| {
                let id = rng.gen_range(1..=rows);
                let (k, v): (i64, String) = stmt
                    .query_row([id], |r| Ok((r.get(0)?, r.get(1)?)))
                    .unwrap();
                (k, v.len())
            })
        });
    }
    g.finish();

    {
        const GROUP: &str = "full_scan";
        let mut g = c.benchmark_group(GROUP);
        g.sample_size(10);
        g.measurement_time(Duration::from_secs(6));
        g.throughput(Throughput::Bytes(
            std::fs::metadata(s.db("bare")).unwrap().len(),
        ));
        for place in ["bare", "primary", "secondary"] {
            let conn = open(&s.db(place));
            let mut stmt = conn.prepare("SELECT sum(length(v)) FROM t").unwrap();
            g.bench_function(BenchmarkId::from_parameter(place), |b| {
                ran.borrow_mut().push(format!("{GROUP}/{place}"));
                b.iter(|| stmt.query_row([], |r| r.get::<_, i64>(0)).unwrap())
            });
        }
        g.finish();
    }
}

/// Commit on the primary → the transaction in its local journal: the tailer
/// reads it from the WAL after SQLite acknowledged it (capture off the write
/// path). 300 single-row commits at random 2-20 ms intervals; the journal
/// is read from its file (status.json would catch the tailer up first).
fn journaled(s: &Setup) -> String {
    let conn = open(&s.db("primary"));
    conn.execute_batch("PRAGMA synchronous=NORMAL").unwrap();
    // Beside the log file, in the daemon's state dir.
    let log = s.primary.status()["log_file"].as_str().unwrap().to_string();
    let journal = rusqlite::Connection::open_with_flags(
        Path::new(&log).with_file_name("journal.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let head = || -> i64 {
        journal
            .query_row("SELECT head_txid FROM dbs WHERE name = ?1", [DB], |r| {
                r.get(0)
            })
            .unwrap()
    };
    let mut rng = rand::thread_rng();
    let mut lat = Vec::new();
    for _ in 0..300 {
        let before = head();
        conn.execute("INSERT INTO w(v) VALUES (?1)", ["journaled?"])
            .unwrap();
        let t = std::time::Instant::now();
        while head() <= before && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_micros(200));
        }
        lat.push(t.elapsed());
        std::thread::sleep(Duration::from_millis(rng.gen_range(2..20)));
    }
    lat.sort();
    let at = |q: f64| lat[((lat.len() - 1) as f64 * q) as usize];
    format!(
        "journaled    primary   commit -> local journal: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms over {} commits (target p99 <= 50 ms: {})",
        at(0.5).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3,
        lat.last().unwrap().as_secs_f64() * 1e3,
        lat.len(),
        if at(0.99) <= Duration::from_millis(50) { "ok" } else { "MISSED" }
    )
}

/// Criterion's median estimate of `group/function`, in ns, if it ran.
fn median_ns(dir: &Path, group: &str, function: &str) -> Option<f64> {
    let p = dir.join(group).join(function).join("new/estimates.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok()?;
    v["median"]["point_estimate"].as_f64()
}

fn ratios(dir: &Path, ran: &[String]) -> Vec<String> {
    let mut out = vec![format!(
        "{:<12} {:<14} {:>12} {:>12}   ratio to bare (target)",
        "bench", "where", "median", "bare median"
    )];
    let rows: [(&str, &str, f64); 7] = [
        ("write_tx", "primary", 0.7),
        ("write_tx", "primary_local", 0.7),
        ("write_tx", "local_daemon", 0.7),
        ("point_query", "primary", 0.9),
        ("point_query", "secondary", 0.9),
        ("full_scan", "primary", 0.9),
        ("full_scan", "secondary", 0.9),
    ];
    for (group, place, target) in rows {
        let this_run = |f: &str| ran.iter().any(|r| *r == format!("{group}/{f}"));
        if !this_run(place) || !this_run("bare") {
            continue;
        }
        let (Some(m), Some(b)) = (median_ns(dir, group, place), median_ns(dir, group, "bare"))
        else {
            continue;
        };
        // Throughput ratio: bare time / mount time.
        let ratio = b / m;
        let verdict = if place == "primary_local" {
            "local path, kernel passthrough".to_string()
        } else if place == "local_daemon" {
            "local path, passthrough off: FUSE alone, for diagnosis".to_string()
        } else if ratio >= target {
            format!(">= {target}x: ok")
        } else {
            format!(">= {target}x: MISSED")
        };
        out.push(format!(
            "{group:<12} {place:<14} {:>12} {:>12}   {ratio:.2}x ({verdict})",
            fmt_ns(m),
            fmt_ns(b)
        ));
    }
    out
}

fn fmt_ns(ns: f64) -> String {
    if ns >= 1e6 {
        format!("{:.2} ms", ns / 1e6)
    } else {
        format!("{:.1} us", ns / 1e3)
    }
}

fn main() {
    let dir = std::env::var_os("CRITERION_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| results_dir().join("criterion"));
    let mut c = Criterion::default()
        .output_directory(&dir)
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .configure_from_args();
    // `cargo bench` runs every bench binary: skip the set-up when the filter
    // leaves nothing of ours to run (criterion would only print nothing).
    let filter = positional_args();
    if !filter.is_empty()
        && !IDS
            .iter()
            .any(|id| filter.iter().any(|f| id.contains(f.as_str())))
    {
        return;
    }
    let s = Setup::new();
    if let Some(secs) = std::env::var("MEMBRIDGE_BENCH_HOLD")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        // For profiling by hand: keep the set-up alive, measure nothing.
        eprintln!(
            "io: holding for {secs} s: bare {}, primary {}, secondary {}",
            s.db("bare").display(),
            s.db("primary").display(),
            s.db("secondary").display()
        );
        std::thread::sleep(Duration::from_secs(secs));
        return;
    }
    let ran = Ran::default();
    write_tx(&mut c, &s, &ran);
    reads(&mut c, &s, &ran);
    c.final_summary();
    let ran = ran.into_inner();
    if !ran.is_empty() {
        let mut lines = vec![format!(
            "{} rows in a {READ_MB} MB database; primary and secondary on membridge mounts (passthrough {}, database served by: {}), SeaweedFS on loopback",
            s.rows,
            s.primary.status()["io"]["passthrough"],
            s.primary.status()["io"]["databases"][DB]
        )];
        lines.extend(ratios(&dir, &ran));
        if ran.iter().any(|r| r.starts_with("write_tx")) {
            lines.push(journaled(&s));
        }
        report("io", &lines);
    }
}
