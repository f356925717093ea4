//! What the benches share: nodes on real mounts (the integration tests'
//! harness), seeded databases, waits on `status.json`, `/proc` readings and the
//! machine description printed with every result.

#![allow(dead_code)] // each bench binary uses a different part

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common::mount::Mount;
use crate::common::SeaweedFs;

pub const DB: &str = "claude-mem.db";

/// Environment for one node of `project` on `bucket`.
pub fn node_env(s3: &SeaweedFs, bucket: &str, project: &str, id: &str) -> Vec<(String, String)> {
    let mut env = s3.env(bucket, project);
    env.push(("MEMBRIDGE_NODE_ID".into(), id.into()));
    env
}

/// A node mounted over a fresh temp dir holding `files`.
pub fn node(
    s3: &SeaweedFs,
    bucket: &str,
    project: &str,
    id: &str,
    files: &[(&str, &[u8])],
) -> Mount {
    Mount::with_files(node_env(s3, bucket, project, id), files)
}

pub fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    while !ok() {
        assert!(
            t.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    t.elapsed()
}

pub fn db_status(m: &Mount) -> serde_json::Value {
    m.status()["databases"][DB].clone()
}

/// Waits until everything the primary captured is in the bucket; returns the head.
pub fn wait_drained(m: &Mount, limit: Duration) -> u64 {
    let mut head = 0;
    wait_for("the primary's backlog to drain", limit, || {
        let s = db_status(m);
        match (s["head_txid"].as_u64(), s["uploaded_txid"].as_u64()) {
            (Some(h), Some(u)) if h == u && s["backlog"].as_u64() == Some(0) => {
                head = h;
                true
            }
            _ => false,
        }
    });
    head
}

/// Waits until the secondary has applied `txid`.
pub fn wait_applied(m: &Mount, txid: u64, limit: Duration) {
    wait_for("the secondary to apply the head", limit, || {
        db_status(m)["applied_txid"].as_u64() >= Some(txid)
    });
}

pub fn open(path: &Path) -> rusqlite::Connection {
    let c = rusqlite::Connection::open(path).unwrap();
    c.busy_timeout(Duration::from_secs(10)).unwrap();
    c
}

/// Opens read-only (never creates the file: a secondary refuses that).
pub fn open_ro(path: &Path) -> rusqlite::Result<rusqlite::Connection> {
    let c =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    c.busy_timeout(Duration::from_secs(10))?;
    Ok(c)
}

pub fn count(c: &rusqlite::Connection) -> rusqlite::Result<i64> {
    c.query_row("SELECT count(*) FROM t", [], |r| r.get(0))
}

/// Bytes of one row's text: half random hex, half filler, so that it compresses
/// about as well as claude-mem's observations (roughly 3:1 with zstd).
pub const ROW_TEXT: &str = "hex(randomblob(100)) || printf('%.200c', 'x')";

/// A WAL-mode, `synchronous=NORMAL` database of about `mb` MB: table
/// `t(id INTEGER PRIMARY KEY, k INTEGER, v TEXT)` and an empty table `w` for
/// write benches, checkpointed so that the main file holds everything.
/// Returns the number of rows of `t`.
pub fn seed(path: &Path, mb: u64) -> i64 {
    let rows = (mb * 1_000_000 / 430) as i64;
    let c = open(path);
    c.execute_batch(&format!(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;
         CREATE TABLE t(id INTEGER PRIMARY KEY, k INTEGER, v TEXT);
         CREATE TABLE w(id INTEGER PRIMARY KEY, v TEXT);
         BEGIN;
         WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < {rows})
           INSERT INTO t(k, v) SELECT abs(random()) % 1000, {ROW_TEXT} FROM c;
         COMMIT;
         PRAGMA wal_checkpoint(TRUNCATE);"
    ))
    .unwrap();
    rows
}

/// A seeded database's bytes, made in a temp dir.
pub fn seeded_bytes(mb: u64) -> (Vec<u8>, i64) {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join(DB);
    let rows = seed(&p, mb);
    (std::fs::read(&p).unwrap(), rows)
}

/// (utime + stime in clock ticks, VmRSS KiB, VmHWM KiB) of `pid`.
pub fn proc_stats(pid: i32) -> (u64, u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let ticks = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (ticks, kb("VmRSS:"), kb("VmHWM:"))
}

pub fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

fn first_line(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// nproc, CPU model, kernel.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!(
        "{nproc} CPUs, {cpu}, Linux {}",
        first_line("uname", &["-r"])
    )
}

/// The 1/5/15-minute load averages.
pub fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split(' ')
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Where the benches leave their summaries (`target/membridge-bench/`).
pub fn results_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    let d = target.join("membridge-bench");
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Prints `lines` under a header naming the machine and its load, and writes
/// them to `target/membridge-bench/<name>.txt`.
pub fn report(name: &str, lines: &[String]) {
    let mut text = format!(
        "# {name}  ({}; load {}; {})\n",
        machine(),
        load(),
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC")
    );
    for l in lines {
        text += l;
        text.push('\n');
    }
    println!("\n{text}");
    let path = results_dir().join(format!("{name}.txt"));
    std::fs::write(&path, &text).unwrap();
    println!("(written to {})", path.display());
}

/// The `q`-quantile (0..=1) of sorted `v`, nearest rank.
pub fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

pub fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

/// The positional arguments (filters) of a bench binary, past the options
/// criterion and cargo pass (`--bench`, `--measurement-time 2`, ...).
pub fn positional_args() -> Vec<String> {
    const WITH_VALUE: &[&str] = &[
        "--warm-up-time",
        "--measurement-time",
        "--sample-size",
        "--save-baseline",
        "--baseline",
        "--baseline-lenient",
        "--load-baseline",
        "--output-format",
        "--color",
        "--profile-time",
        "--plotting-backend",
        "--noise-threshold",
        "--confidence-level",
        "--significance-level",
        "--nresamples",
        "--format",
        "--logfile",
    ];
    let mut out = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if WITH_VALUE.contains(&a.as_str()) {
            args.next();
        } else if !a.starts_with('-') {
            out.push(a);
        }
    }
    out
}
