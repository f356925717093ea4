//! Peak memory against database size (issue 12): the daemon's VmHWM from
//! `/proc/PID/status` must not grow with the database (target: <= 100 MB plus
//! the configured cache for 1 GB), so a 1 GB claude-mem database does not cost
//! 2 GB of RAM to replicate.
//!
//! For each size (`MEMBRIDGE_BENCH_MEMORY_MB`, default `100,300,1000`), on a
//! fresh bucket:
//! - `primary`: mount over the seeded database; peak RSS of the daemon once the
//!   first snapshot and the old tool's `sqlite/` copy are in the bucket.
//! - `push`: one more transaction, then `membridge push` (the base image
//!   advances and a new snapshot and old-tool copy go up); the primary
//!   daemon's peak RSS since it started.
//! - `secondary`: mount an empty directory on the same bucket; peak RSS of its
//!   daemon once it has applied the head and its copy is whole and verified
//!   (a fresh secondary serves from the snapshot at once and hydrates behind;
//!   the read-through cache is `MEMBRIDGE_CACHE_MB`, default 64).
//! - `restore`: `membridge restore` of the head to a file; the command's
//!   `ru_maxrss`.
//!
//! `MEMBRIDGE_BIN` measures another build of membridge (e.g. a copy of the
//! binary before a change) with this harness.
//!
//! Not part of a plain `cargo bench` (minutes, and 3 GB of disk for the 1 GB
//! database, its base image and the bucket): `cargo bench --bench memory --
//! memory`, or `./scripts/bench.sh -- memory`, or with the sizes set.

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use common::mount::Mount;
use common::SeaweedFs;
use membridge::remote::ObjectStore;
use support::*;

/// Seeding, uploading and hydrating 1 GB on 2 cores takes minutes.
const LIMIT: Duration = Duration::from_secs(1800);

fn bin() -> String {
    std::env::var("MEMBRIDGE_BIN").unwrap_or_else(|_| common::mount::BIN.to_string())
}

/// `membridge ARGS` with the mount's environment, as `Mount::cmd` builds it
/// but with [`bin`].
fn cmd(m: &Mount, args: &[&str]) -> Command {
    let mut c = Command::new(bin());
    c.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", m.state.join("home"))
        .env("MEMBRIDGE_STATE_DIR", &m.state)
        .env("RUST_LOG", "info");
    for (k, v) in &m.env {
        c.env(k, v);
    }
    c
}

fn mount(m: &Mount) {
    let out = cmd(m, &["mount", m.dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mount failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `c` to completion; its peak RSS in KiB (wait4's `ru_maxrss`).
#[allow(clippy::zombie_processes)] // reaped by wait4, which std's Child does not offer
fn peak_of(mut c: Command) -> u64 {
    let child = c.spawn().unwrap();
    let mut status = 0;
    // SAFETY: rusage is plain data, filled by the kernel.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child, with valid out-pointers.
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut ru) };
    assert_eq!(pid, child.id() as i32, "wait4");
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "membridge restore failed ({status})"
    );
    ru.ru_maxrss as u64
}

fn has_key(store: &dyn ObjectStore, suffix: &str) -> bool {
    common::block_on(store.list(""))
        .map(|l| l.iter().any(|o| o.key.ends_with(suffix)))
        .unwrap_or(false)
}

fn main() {
    // Minutes and gigabytes of disk: only when asked for by name or size.
    let wanted = positional_args();
    let asked = wanted.iter().any(|w| w == "memory")
        || std::env::var_os("MEMBRIDGE_BENCH_MEMORY_MB").is_some();
    if !asked {
        eprintln!("memory: skipped (run `cargo bench --bench memory -- memory`)");
        return;
    }
    let sizes: Vec<u64> = std::env::var("MEMBRIDGE_BENCH_MEMORY_MB")
        .unwrap_or_else(|_| "100,300,1000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    eprintln!("memory: sizes {sizes:?} MB, binary {}", bin());
    let s3 = SeaweedFs::start();
    let mut lines = vec![format!(
        "{:>9} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "db", "primary", "push", "secondary", "restore", "seconds"
    )];
    for mb in sizes {
        let t = Instant::now();
        let bucket = s3.new_bucket("bench-mem");
        let store = s3.store(&bucket);
        let project = format!("mem{mb}");
        let a = Mount::prepared(node_env(&s3, &bucket, &project, "mem-a"), &[]);
        seed(&a.dir.join(DB), mb);
        let size = std::fs::metadata(a.dir.join(DB)).unwrap().len();
        eprintln!("memory: seeded {} in {:?}", support::mb(size), t.elapsed());
        mount(&a);
        wait_drained(&a, LIMIT);
        // The old tool's copy is uploaded last (or given up on: logged).
        let mut legacy = true;
        wait_for("the old tool's copy", LIMIT, || {
            legacy = !a.log_tail(50).contains("legacy snapshot not published");
            !legacy || has_key(&store, "sqlite/manifest.json")
        });
        let primary = proc_stats(a.pid()).2;
        eprintln!("memory: primary done at {:?}", t.elapsed());
        // `membridge push` over one more transaction: the base image moves to
        // it and a new snapshot (and old-tool copy) is published.
        open(&a.dir.join(DB))
            .execute("INSERT INTO w(v) VALUES ('push')", [])
            .unwrap();
        let head = wait_drained(&a, LIMIT);
        let out = cmd(&a, &["push"]).output().unwrap();
        assert!(
            out.status.success(),
            "push: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let push = proc_stats(a.pid()).2;
        eprintln!("memory: push done at {:?}", t.elapsed());

        let b = Mount::prepared(node_env(&s3, &bucket, &project, "mem-b"), &[]);
        mount(&b);
        wait_applied(&b, head, LIMIT);
        // A fresh secondary serves from the snapshot at once and hydrates in
        // the background; it is done when the whole file was verified.
        wait_for(
            "the secondary's copy to be whole and verified",
            LIMIT,
            || db_status(&b)["hydration"]["verified"].as_bool() == Some(true),
        );
        let secondary = proc_stats(b.pid()).2;
        eprintln!("memory: secondary done at {:?}", t.elapsed());

        let out = a.state.join("restored.db");
        let restore = peak_of({
            let mut c = cmd(&a, &["restore", "--db", DB, "--to", out.to_str().unwrap()]);
            c.stdout(std::process::Stdio::null());
            c
        });
        assert_eq!(std::fs::metadata(&out).unwrap().len(), size);
        let _ = std::fs::remove_file(&out);
        let line = format!(
            "{:>9} {:>10} {:>10} {:>10} {:>10} {:>10.0}",
            support::mb(size),
            kib(primary) + if legacy { "" } else { "*" },
            kib(push),
            kib(secondary),
            kib(restore),
            t.elapsed().as_secs_f64()
        );
        eprintln!("memory: {line}");
        lines.push(line);
        drop(b);
        drop(a);
        cleanup(&s3, &bucket);
    }
    lines.push(
        "peak RSS: VmHWM of the daemon (push: the primary's, after `membridge push`); ru_maxrss of `membridge restore`"
            .into(),
    );
    lines.push("* the old tool's sqlite/ copy was not uploaded (see the daemon's log)".into());
    report("memory", &lines);
}

fn kib(k: u64) -> String {
    format!("{} MB", k / 1024)
}

/// Deletes the bucket's objects so the next size does not need the disk
/// space of all the previous ones.
fn cleanup(s3: &SeaweedFs, bucket: &str) {
    let store = s3.store(bucket);
    if let Ok(all) = common::block_on(store.list("")) {
        for o in all {
            let _ = common::block_on(store.delete(&o.key));
        }
    }
}
