//! claude-mem's hook round trip on the mounts against a plain directory, in
//! one run (issue 10): the UserPromptSubmit hook (`session-init`, which saves
//! the prompt through the worker) and a memory save through the worker's
//! HTTP API, on a bare data dir, on the primary's mount and on a secondary's
//! (where the save is refused: the round trip is what a user waits for).
//!
//! `cargo bench --bench hooks` (or `scripts/bench.sh -- hooks`); needs the
//! pinned Bun and claude-mem of `scripts/install-deps.sh`.

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use common::claude_mem::{Client, Worker};
use common::SeaweedFs;
use serde_json::json;

const RUNS: usize = 15;

/// Per run: (session-init hook, memory save).
fn measure(client: &Client, name: &str, dir: &Path) -> (Vec<Duration>, Vec<Duration>) {
    let w = Worker::start(client, name, dir);
    w.wait_initialized(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}"));
    // One whole session first: the worker warms up, the schema exists.
    let _ = w.session("warm-up", "warm up");
    let (mut hooks, mut saves) = (Vec::new(), Vec::new());
    for i in 0..RUNS {
        let input = json!({
            "session_id": format!("bench-{i}"),
            "cwd": w.project_dir(),
            "prompt": format!("benchmark prompt {i}"),
            "permission_mode": "default",
        });
        let r = w.hook("session-init", &input);
        hooks.push(r.elapsed);
        let t = Instant::now();
        let _ = w.save_memory(&format!("bench note {i}"), "a benchmark memory");
        saves.push(t.elapsed());
    }
    hooks.sort();
    saves.sort();
    (hooks, saves)
}

fn line(what: &str, v: &[Duration], bare: &[Duration]) -> String {
    let p50 = support::quantile(v, 0.5);
    let b50 = support::quantile(bare, 0.5);
    format!(
        "{what:<34} p50 {:>7.1} ms  p95 {:>7.1} ms  ({:.2}x bare)",
        p50.as_secs_f64() * 1e3,
        support::quantile(v, 0.95).as_secs_f64() * 1e3,
        p50.as_secs_f64() / b50.as_secs_f64().max(1e-9)
    )
}

fn main() {
    let filters = support::positional_args();
    if !filters.is_empty() && !filters.iter().any(|f| "hooks".contains(f.as_str())) {
        return;
    }
    let client = Client::find();
    let bare = tempfile::tempdir().unwrap();
    let (bare_hook, bare_save) = measure(&client, "bare", bare.path());
    let s3 = SeaweedFs::shared();
    let bucket = s3.new_bucket("bench-hooks");
    let a = support::node(s3, &bucket, "bench-hooks", "node-a", &[]);
    let (a_hook, a_save) = measure(&client, "node-a", &a.dir);
    let b = support::node(s3, &bucket, "bench-hooks", "node-b", &[]);
    support::wait_for("the secondary's copy", Duration::from_secs(60), || {
        support::db_status(&b)["applied_txid"].as_u64()
            >= support::db_status(&a)["head_txid"].as_u64()
    });
    let (b_hook, b_save) = measure(&client, "node-b", &b.dir);
    support::report(
        "hooks",
        &[
            format!("claude-mem 13.25.3 worker under Bun, {RUNS} runs each"),
            line("prompt hook, bare directory", &bare_hook, &bare_hook),
            line("prompt hook, primary", &a_hook, &bare_hook),
            line("prompt hook, secondary (refused)", &b_hook, &bare_hook),
            line("memory save, bare directory", &bare_save, &bare_save),
            line("memory save, primary", &a_save, &bare_save),
            line("memory save, secondary (refused)", &b_save, &bare_save),
        ],
    );
}
