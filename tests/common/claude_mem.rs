//! claude-mem's own worker and hooks, run the way its plugin runs them, on a data
//! dir (a membridge mount): the worker is started and stopped with its lifecycle
//! commands, hooks get their JSON on stdin through the plugin's `bun-runner.js`,
//! and the HTTP API is spoken over plain loopback HTTP.
//!
//! Bun and the packed claude-mem come from `scripts/install-deps.sh` (`.deps/`),
//! or from `MEMBRIDGE_BUN` (the bun binary) and `MEMBRIDGE_CLAUDE_MEM` (the
//! extracted package dir). Missing ones fail the test: `.ci/run` installs them.
//!
//! Every process a [`Worker`] starts carries a tag in its environment; dropping
//! the worker (also on panic) kills every process with that tag, including
//! daemons claude-mem detaches with `setsid`, and a watchdog does the same if
//! the test process dies first.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The claude-mem release the tests drive (pinned in `scripts/install-deps.sh`).
pub const CLAUDE_MEM_VERSION: &str = "13.25.3";
/// The Bun release that runs it (pinned in `scripts/install-deps.sh`).
pub const BUN_VERSION: &str = "1.4.5";
/// The project the hooks report (the basename of their `cwd`).
pub const PROJECT: &str = "membridge-e2e";
/// Environment variable that marks every process a [`Worker`] starts.
const TAG_VAR: &str = "MEMBRIDGE_CLAUDE_MEM_TAG";
/// Longest a hook may run: hooks.json gives 60 s, 120 s for the async ones.
const HOOK_TIMEOUT: Duration = Duration::from_secs(130);

/// Where Bun, node and claude-mem's plugin are.
#[derive(Debug, Clone)]
pub struct Client {
    pub bun: PathBuf,
    pub node: PathBuf,
    /// `<package>/plugin`: scripts/, hooks/, node_modules/.
    pub plugin: PathBuf,
}

impl Client {
    /// Finds the pinned client, or fails the test saying how to install it.
    pub fn find() -> Client {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let bun = std::env::var_os("MEMBRIDGE_BUN")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join(".deps/bin/bun"));
        let package = std::env::var_os("MEMBRIDGE_CLAUDE_MEM")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join(format!(".deps/claude-mem-{CLAUDE_MEM_VERSION}/package")));
        let plugin = package.join("plugin");
        let fix =
            "run scripts/install-deps.sh (it installs pinned Bun and claude-mem into .deps/), \
                   or set MEMBRIDGE_BUN / MEMBRIDGE_CLAUDE_MEM";
        let version = Command::new(&bun)
            .arg("--version")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
        assert_eq!(
            version.as_deref(),
            Some(BUN_VERSION),
            "Bun {BUN_VERSION} not found at {}: {fix}",
            bun.display()
        );
        let manifest = std::fs::read_to_string(plugin.join("package.json")).unwrap_or_default();
        let manifest: Value = serde_json::from_str(&manifest).unwrap_or(Value::Null);
        assert!(
            manifest["version"] == CLAUDE_MEM_VERSION
                && plugin.join("scripts/worker-service.cjs").is_file()
                && plugin.join("node_modules/zod/package.json").is_file(),
            "claude-mem {CLAUDE_MEM_VERSION} with its plugin dependencies not found in {}: {fix}",
            plugin.display()
        );
        let node = which("node").unwrap_or_else(|| {
            panic!("node (runs claude-mem's hook launcher) is not on PATH: {fix}")
        });
        Client { bun, node, plugin }
    }

    fn script(&self, name: &str) -> PathBuf {
        self.plugin.join("scripts").join(name)
    }
}

/// One hook or lifecycle command as the plugin ran it.
#[derive(Debug, Clone)]
pub struct HookRun {
    pub event: String,
    pub elapsed: Duration,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl HookRun {
    /// The context the hook hands to the model, if any.
    pub fn additional_context(&self) -> Option<String> {
        let v: Value = serde_json::from_str(self.stdout.lines().next()?).ok()?;
        v["hookSpecificOutput"]["additionalContext"]
            .as_str()
            .map(str::to_string)
    }
}

/// Byte offsets into the worker's log files, to look at what came after.
#[derive(Debug, Clone, Default)]
pub struct LogMark(BTreeMap<PathBuf, usize>);

/// A claude-mem worker on `data_dir`, with its own HOME and loopback port,
/// killed (with everything it started) when dropped.
pub struct Worker {
    pub name: String,
    pub data_dir: PathBuf,
    pub port: u16,
    client: Client,
    home: tempfile::TempDir,
    tag: String,
    env: Vec<(String, String)>,
    watchdog: Option<Child>,
}

impl Worker {
    /// Starts claude-mem's worker on `data_dir` the way its SessionStart hook
    /// does (`worker-service.cjs start`, which spawns `--daemon` detached with
    /// the data dir as cwd), and waits until it answers on its port.
    pub fn start(client: &Client, name: &str, data_dir: &Path) -> Worker {
        let home = tempfile::Builder::new()
            .prefix(&format!("membridge-cm-{name}-"))
            .tempdir()
            .expect("a HOME for the worker");
        let port = free_port();
        let tag = format!(
            "{name}-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        );
        let mut path = vec![client.bun.parent().unwrap().to_path_buf()];
        path.push(client.node.parent().unwrap().to_path_buf());
        path.extend(["/usr/bin", "/bin"].map(PathBuf::from));
        let path = std::env::join_paths(path).unwrap().into_string().unwrap();
        let h = home.path();
        std::fs::create_dir_all(h.join("work").join(PROJECT)).unwrap();
        let env: Vec<(String, String)> = [
            ("PATH", path),
            ("HOME", h.display().to_string()),
            ("TMPDIR", std::env::temp_dir().display().to_string()),
            ("CLAUDE_MEM_DATA_DIR", data_dir.display().to_string()),
            ("CLAUDE_MEM_WORKER_PORT", port.to_string()),
            ("CLAUDE_MEM_WORKER_HOST", "127.0.0.1".into()),
            ("CLAUDE_PLUGIN_ROOT", client.plugin.display().to_string()),
            // No API key and no model: a Claude CLI that does not exist keeps
            // the observer agent from ever calling out, whatever is installed.
            (
                "CLAUDE_CODE_PATH",
                h.join("no-claude-cli").display().to_string(),
            ),
            // The vector store needs uvx and PyPI; search falls back to FTS5.
            ("CLAUDE_MEM_CHROMA_ENABLED", "false".into()),
            ("DO_NOT_TRACK", "1".into()),
            (TAG_VAR, tag.clone()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let mut w = Worker {
            name: name.to_string(),
            data_dir: data_dir.to_path_buf(),
            port,
            client: client.clone(),
            home,
            tag,
            env,
            watchdog: None,
        };
        w.watchdog = Some(spawn_watchdog(&w.tag).expect("start the worker watchdog"));
        let start = w.lifecycle("start");
        assert!(
            start.code == Some(0) && start.stdout.contains("\"ready\""),
            "claude-mem `start` on {name} failed: {start:?}\n{}",
            w.log_tail(40)
        );
        w.health()
            .unwrap_or_else(|e| panic!("{name}: the worker does not answer after `start`: {e}"));
        w
    }

    /// The worker's HOME (transcripts, the bun cache).
    pub fn home(&self) -> &Path {
        self.home.path()
    }

    /// The directory the hooks report as their cwd.
    pub fn project_dir(&self) -> PathBuf {
        self.home.path().join("work").join(PROJECT)
    }

    /// `GET /api/health` as JSON.
    pub fn health(&self) -> Result<Value, String> {
        let (status, body) = self.get("/api/health").map_err(|e| e.to_string())?;
        if status != 200 {
            return Err(format!("health answered {status}: {body}"));
        }
        serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))
    }

    /// The worker's pid, from its health answer.
    pub fn pid(&self) -> Option<i32> {
        self.health().ok()?["pid"].as_i64().map(|p| p as i32)
    }

    /// Waits until the worker has opened the database and serves its API.
    pub fn wait_initialized(&self, limit: Duration) -> Result<Duration, String> {
        let t = Instant::now();
        loop {
            let h = self.health();
            if h.as_ref().is_ok_and(|h| h["initialized"] == true) {
                return Ok(t.elapsed());
            }
            // A worker whose initialization failed never retries it.
            let fatal = self
                .log_text(None, None)
                .contains("Background initialization failed");
            if fatal || t.elapsed() > limit {
                return Err(format!(
                    "claude-mem's worker on {} did not initialize (waited {:?}; health: {}).\n\
                     SQLite errors in its log: {:#?}",
                    self.name,
                    t.elapsed(),
                    match &h {
                        Ok(h) => format!("initialized={} pid={}", h["initialized"], h["pid"]),
                        Err(e) => e.clone(),
                    },
                    self.sqlite_errors(None, None, false)
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs a lifecycle command (`start`, `stop`, `restart`, `status`) as the
    /// plugin does: `node bun-runner.js worker-service.cjs <cmd>`.
    pub fn lifecycle(&self, cmd: &str) -> HookRun {
        self.run_plugin(cmd, &[cmd], None)
    }

    /// Runs hook `event` (`context`, `session-init`, `observation`,
    /// `file-context`, `summarize`, `session-end`) with `input` on stdin, as
    /// hooks.json does: `node bun-runner.js worker-service.cjs hook claude-code <event>`.
    pub fn hook(&self, event: &str, input: &Value) -> HookRun {
        let stdin = serde_json::to_vec(input).unwrap();
        self.run_plugin(event, &["hook", "claude-code", event], Some(&stdin))
    }

    fn run_plugin(&self, label: &str, args: &[&str], stdin: Option<&[u8]>) -> HookRun {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(&self.client.node);
        cmd.arg(self.client.script("bun-runner.js"))
            .arg(self.client.script("worker-service.cjs"))
            .args(args)
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .current_dir(self.project_dir())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let t = Instant::now();
        let mut child = cmd
            .spawn()
            .expect("run claude-mem's bun-runner.js under node");
        let mut input = child.stdin.take().unwrap();
        if let Some(bytes) = stdin {
            let _ = input.write_all(bytes);
        }
        drop(input);
        let out = wait_with_timeout(child, HOOK_TIMEOUT);
        HookRun {
            event: label.to_string(),
            elapsed: t.elapsed(),
            code: out.0,
            stdout: out.1,
            stderr: out.2,
        }
    }

    /// One Claude Code session on this node, hook by hook as hooks.json runs
    /// them: SessionStart (`start`, `context`), UserPromptSubmit, PreToolUse
    /// (Read), PostToolUse twice, Stop (with a transcript), SessionEnd.
    pub fn session(&self, session_id: &str, prompt: &str) -> Vec<HookRun> {
        let cwd = self.project_dir();
        let file = cwd.join("src/frobnicator.rs");
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, "pub fn frobnicate() {}\n").unwrap();
        let transcript = self
            .home
            .path()
            .join(".claude/projects")
            .join(PROJECT)
            .join(format!("{session_id}.jsonl"));
        std::fs::create_dir_all(transcript.parent().unwrap()).unwrap();
        let lines = [
            json!({"type": "user", "message": {"role": "user", "content": prompt}}),
            json!({"type": "assistant", "message": {"role": "assistant", "content": [
                {"type": "text", "text": format!("Done: {prompt}. The frobnicator now caches widgets.")}
            ]}}),
        ];
        let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        std::fs::write(&transcript, text).unwrap();
        let base = json!({
            "session_id": session_id,
            "transcript_path": transcript,
            "cwd": cwd,
            "permission_mode": "default",
        });
        let with = |extra: Value| {
            let mut v = base.clone();
            v.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            v
        };
        let read = json!({"file_path": file});
        let mut runs = vec![self.lifecycle("start")];
        runs.push(self.hook(
            "context",
            &with(json!({"hook_event_name": "SessionStart", "source": "startup"})),
        ));
        runs.push(self.hook(
            "session-init",
            &with(json!({"hook_event_name": "UserPromptSubmit", "prompt": prompt})),
        ));
        runs.push(self.hook(
            "file-context",
            &with(
                json!({"hook_event_name": "PreToolUse", "tool_name": "Read", "tool_input": read}),
            ),
        ));
        for (i, tool) in ["Read", "Bash"].iter().enumerate() {
            let (input, response) = if *tool == "Read" {
                (
                    read.clone(),
                    json!({"type": "text", "file": {"content": "pub fn frobnicate() {}\n"}}),
                )
            } else {
                (
                    json!({"command": "cargo test frob"}),
                    json!({"stdout": "test frob ... ok", "stderr": "", "interrupted": false}),
                )
            };
            runs.push(self.hook(
                "observation",
                &with(json!({
                    "hook_event_name": "PostToolUse",
                    "tool_name": tool,
                    "tool_input": input,
                    "tool_response": response,
                    "tool_use_id": format!("toolu_{session_id}_{i}"),
                })),
            ));
        }
        runs.push(self.hook(
            "summarize",
            &with(json!({"hook_event_name": "Stop", "stop_hook_active": false})),
        ));
        runs.push(self.hook(
            "session-end",
            &with(json!({"hook_event_name": "SessionEnd", "reason": "exit"})),
        ));
        runs
    }

    /// Saves a memory titled `title` and fails the test unless the worker
    /// took it.
    pub fn saved(&self, title: &str) {
        let (status, body) =
            self.save_memory(title, &format!("{title}: the frobnicator caches widgets"));
        assert!(
            status == 200 && body.contains("\"success\":true"),
            "{}: saving {title:?} answered {status} {body}\n{}",
            self.name,
            self.log_tail(20)
        );
    }

    /// `POST /api/memory/save` (the mem-search skill's "remember this").
    pub fn save_memory(&self, title: &str, text: &str) -> (u16, String) {
        self.post(
            "/api/memory/save",
            &json!({"title": title, "text": text, "project": PROJECT}),
        )
        .unwrap_or_else(|e| panic!("{}: save_memory: {e}", self.name))
    }

    /// `POST /api/import` of one finished session with an observation and a
    /// summary, standing in for what the observer agent (an LLM) would write.
    pub fn import_session(&self, session: &str, title: &str) -> (u16, String) {
        let now = chrono::Utc::now();
        let (iso, epoch) = (now.to_rfc3339(), now.timestamp_millis());
        let body = json!({
            "sessions": [{
                "content_session_id": format!("cs-{session}"), "memory_session_id": format!("ms-{session}"),
                "project": PROJECT, "platform_source": "claude-code", "user_prompt": title,
                "started_at": iso, "started_at_epoch": epoch, "completed_at": iso,
                "completed_at_epoch": epoch, "status": "completed"
            }],
            "observations": [{
                "memory_session_id": format!("ms-{session}"), "project": PROJECT, "text": null,
                "type": "discovery", "title": title, "subtitle": "imported",
                "facts": "[\"the frobnicator keeps 64 widgets\"]",
                "narrative": format!("{title}: widgets live in a ring buffer."),
                "concepts": "[\"how-it-works\"]", "files_read": "[\"src/frobnicator.rs\"]",
                "files_modified": "[]", "prompt_number": 1, "discovery_tokens": 100,
                "created_at": iso, "created_at_epoch": epoch
            }],
            "summaries": [{
                "memory_session_id": format!("ms-{session}"), "project": PROJECT, "request": title,
                "investigated": "src/frobnicator.rs", "learned": "ring buffer", "completed": "wiring",
                "next_steps": "tests", "files_read": "[]", "files_edited": "[]", "notes": null,
                "prompt_number": 1, "discovery_tokens": 10, "created_at": iso, "created_at_epoch": epoch
            }],
            "prompts": []
        });
        self.post("/api/import", &body)
            .unwrap_or_else(|e| panic!("{}: import: {e}", self.name))
    }

    /// `GET /api/search` for `query` in the test project: the text answer.
    pub fn search(&self, query: &str) -> (u16, String) {
        self.get(&format!(
            "/api/search?query={}&project={PROJECT}&limit=50",
            query.replace(' ', "%20")
        ))
        .unwrap_or_else(|e| panic!("{}: search: {e}", self.name))
    }

    /// `GET /api/context/inject` for the test project (what SessionStart injects).
    pub fn context(&self) -> (u16, String) {
        self.get(&format!("/api/context/inject?project={PROJECT}"))
            .unwrap_or_else(|e| panic!("{}: context: {e}", self.name))
    }

    pub fn get(&self, path: &str) -> std::io::Result<(u16, String)> {
        http(self.port, "GET", path, None)
    }

    pub fn post(&self, path: &str, body: &Value) -> std::io::Result<(u16, String)> {
        http(self.port, "POST", path, Some(&body.to_string()))
    }

    fn log_files(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(self.data_dir.join("logs"))
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
            .unwrap_or_default();
        files.retain(|p| p.extension().is_some_and(|e| e == "log"));
        files.sort();
        files
    }

    /// Where the logs end now.
    pub fn log_mark(&self) -> LogMark {
        LogMark(
            self.log_files()
                .into_iter()
                .map(|p| {
                    let n = std::fs::metadata(&p).map(|m| m.len() as usize).unwrap_or(0);
                    (p, n)
                })
                .collect(),
        )
    }

    /// The log text written between `since` and `until` (whole logs by default).
    pub fn log_text(&self, since: Option<&LogMark>, until: Option<&LogMark>) -> String {
        let mut out = String::new();
        for p in self.log_files() {
            let bytes = std::fs::read(&p).unwrap_or_default();
            let from = since.and_then(|m| m.0.get(&p)).copied().unwrap_or(0);
            let to = until
                .map(|m| m.0.get(&p).copied().unwrap_or(0))
                .unwrap_or(bytes.len());
            if from < to && to <= bytes.len() {
                out.push_str(&String::from_utf8_lossy(&bytes[from..to]));
            }
        }
        out
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text = self.log_text(None, None);
        let all: Vec<&str> = text.lines().collect();
        format!(
            "--- {}'s claude-mem log (last {lines} lines) ---\n{}",
            self.name,
            all[all.len().saturating_sub(lines)..].join("\n")
        )
    }

    /// Log lines (worker and hooks share the log) that show an SQLite error,
    /// or claude-mem giving up on its database. With `allow_readonly`, SQLite's
    /// refusal of a write on a read-only database is expected and left out.
    pub fn sqlite_errors(
        &self,
        since: Option<&LogMark>,
        until: Option<&LogMark>,
        allow_readonly: bool,
    ) -> Vec<String> {
        sqlite_error_lines(&self.log_text(since, until), allow_readonly)
    }

    /// Backup copies of the database claude-mem made in its data dir: its
    /// one-time migrations copy the whole database before they run.
    pub fn backups(&self) -> Vec<String> {
        database_backups(&self.data_dir)
    }

    /// Kills every process this worker started (it and its children, the
    /// detached daemon, a successor spawned by `restart`), and waits for them.
    pub fn kill(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let pids = tagged_pids(&self.tag);
            if pids.is_empty() {
                return;
            }
            for pid in &pids {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(*pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            assert!(
                Instant::now() < deadline,
                "{}: processes {pids:?} survive SIGKILL",
                self.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill();
        if let Some(mut w) = self.watchdog.take() {
            let _ = w.kill();
            let _ = w.wait();
        }
    }
}

/// Signatures of SQLite failures as claude-mem logs them (its own messages,
/// bun:sqlite's `SQLiteError`, and errno text from the file system).
const SQLITE_SIGNS: &[&str] = &[
    "SQLiteError",
    "SQLITE_",
    "disk I/O error",
    "database is locked",
    "database table is locked",
    "malformed",
    "readonly database",
    "unable to open database",
    "file is not a database",
    "no such table",
    "Transport endpoint is not connected",
];
/// claude-mem giving up on its database: never expected, readonly or not.
const FATAL_SIGNS: &[&str] = &[
    "Background initialization failed",
    "Failed to apply SQLite pragma",
    "cwd-remap failed",
    "v12.4.3 cleanup failed",
    "v12.4.3 backup failed",
];

/// How SQLite reports a write a secondary refused: "disk I/O error" for a
/// frame refused at the `-wal` (WAL mode has no other code for it), readonly
/// for a rollback journal refused.
const REFUSALS: [&str; 2] = ["attempt to write a readonly database", "disk I/O error"];

pub fn sqlite_error_lines(log: &str, allow_readonly: bool) -> Vec<String> {
    log.lines()
        .filter(|l| {
            FATAL_SIGNS.iter().any(|s| l.contains(s))
                || (SQLITE_SIGNS.iter().any(|s| l.contains(s))
                    && !(allow_readonly && REFUSALS.iter().any(|r| l.contains(r))))
        })
        .map(|l| l.chars().take(400).collect())
        .collect()
}

/// `claude-mem.db.bak-*` copies and files under `backups/` in `dir`.
pub fn database_backups(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains(".bak"))
                .collect()
        })
        .unwrap_or_default();
    if let Ok(d) = std::fs::read_dir(dir.join("backups")) {
        out.extend(
            d.filter_map(|e| e.ok())
                .map(|e| format!("backups/{}", e.file_name().to_string_lossy())),
        );
    }
    out.sort();
    out
}

/// `sqlite3 -readonly <db> <sql>` (the CLI, with a busy timeout as a user's
/// script would set): stdout, or the error.
pub fn sqlite3(db: &Path, sql: &str) -> Result<String, String> {
    let out = Command::new("sqlite3")
        .arg("-readonly")
        .args(["-cmd", ".timeout 5000"])
        .arg(db)
        .arg(sql)
        .output()
        .map_err(|e| format!("sqlite3: {e}"))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() || !stderr.trim().is_empty() {
        return Err(format!("sqlite3 {} {sql:?}: {stderr}", db.display()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Median of `xs` (zero when empty).
pub fn median(xs: &[Duration]) -> Duration {
    let mut v = xs.to_vec();
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// One HTTP/1.0 exchange (the server closes, so no chunking): status and body.
fn http(port: u16, method: &str, path: &str, body: Option<&str>) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not HTTP: {head:?}")))?;
    Ok((status, body.to_string()))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Pids whose environment carries `TAG_VAR=tag`.
fn tagged_pids(tag: &str) -> Vec<i32> {
    let needle = format!("{TAG_VAR}={tag}\0");
    let me = std::process::id() as i32;
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
                .filter(|pid| *pid != me)
                .filter(|pid| {
                    std::fs::read(format!("/proc/{pid}/environ"))
                        .is_ok_and(|env| env.windows(needle.len()).any(|w| w == needle.as_bytes()))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Kills the tagged processes once this test process is gone (a test killed
/// before its `Drop` ran). It carries no tag itself.
fn spawn_watchdog(tag: &str) -> std::io::Result<Child> {
    const SCRIPT: &str = r#"
while kill -0 "$1" 2>/dev/null; do sleep 0.5; done
for f in /proc/[0-9]*/environ; do
  if tr '\0' '\n' < "$f" 2>/dev/null | grep -qx "$2"; then
    p=${f#/proc/}; kill -KILL "${p%/environ}" 2>/dev/null
  fi
done
"#;
    Command::new("sh")
        .args(["-c", SCRIPT, "membridge-claude-mem-watchdog"])
        .arg(std::process::id().to_string())
        .arg(format!("{TAG_VAR}={tag}"))
        .env_remove(TAG_VAR)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
}

/// Waits for `child` (in its own process group) up to `limit`, then kills the
/// group: exit code, stdout, stderr.
fn wait_with_timeout(mut child: Child, limit: Duration) -> (Option<i32>, String, String) {
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let ereader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Ok(Some(st)) = child.try_wait() {
            break Some(st);
        }
        if Instant::now() > deadline {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    (
        status.and_then(|s| s.code()),
        reader.join().unwrap_or_default(),
        ereader.join().unwrap_or_default(),
    )
}
