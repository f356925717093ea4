//! `membridge doctor`: checks, one line each, that this node can work with the
//! bucket: the resolved configuration, that the endpoint answers, that it accepts
//! the credentials, that the bucket exists, that the server really enforces the
//! conditional writes the lease and manifest depend on, and what the lease says.
//!
//! ```text
//! [ok]   config: endpoint http://127.0.0.1:9000, bucket claude-mem, ...
//! [ok]   bucket reachable: http://127.0.0.1:9000 (bucket claude-mem)
//! [FAIL] credentials rejected: SignatureDoesNotMatch: ... (check MINIO_ACCESS_KEY and MINIO_SECRET_KEY)
//! ```
//!
//! Secrets are never printed: the config line leaves the keys out, and store
//! errors are scrubbed of them by the store itself.
//!
//! [`run_full`] (what `membridge doctor [DIR]` runs) adds this machine's side:
//! identity, the mount and its `.membridge/status.json` (role, replication lag,
//! backlog, last error), each replicated database (`PRAGMA integrity_check`,
//! read-only, through the mount when mounted, and the claude-mem counts), and
//! what is installed (mount helper, systemd units, the Claude SessionStart hook,
//! the old tool's hooks). It ends with one verdict line and exit code:
//!
//! | last line | when | exit |
//! |---|---|---|
//! | `STATUS: OK` | every check ok (info lines do not count) | 0 |
//! | `STATUS: DEGRADED` | some warning, no failure (not mounted, backlog waiting, lag, leadership disabled...) | 4 |
//! | `STATUS: ERROR` | some failure (bucket unreachable, credentials, corrupt database, stale mount...) | 1 |
//!
//! 2 and 3 stay the old tool's "refused on the primary / on a secondary".

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use chrono::Utc;

use crate::config::{Config, Policy};
use crate::lease::Lease;
use crate::remote::{Layout, ObjectStore, PutMode, S3Options, S3Store, StoreError};

/// The outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    /// For the record only; never changes the verdict (e.g. no mount helper).
    Info,
    /// Works, but the user should know (e.g. leadership disabled).
    Warn,
    Fail,
    /// Not run because an earlier check failed.
    Skip,
}

impl fmt::Display for Status {
    /// Padded to one width so that the names line up.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Status::Ok => "[ok]  ",
            Status::Info => "[info]",
            Status::Warn => "[warn]",
            Status::Fail => "[FAIL]",
            Status::Skip => "[skip]",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub status: Status,
    pub name: String,
    pub detail: String,
}

/// Every check that ran, in order. The CLI exits with [`DoctorReport::exit_code`].
#[derive(Debug, Clone, Default)]
pub struct DoctorReport {
    pub checks: Vec<Check>,
}

impl DoctorReport {
    /// No check failed (warnings and skips do not fail the run by themselves;
    /// a skip only happens after a failure).
    pub fn passed(&self) -> bool {
        !self.checks.iter().any(|c| c.status == Status::Fail)
    }

    /// The verdict: an error if any check failed, degraded if any warned.
    pub fn verdict(&self) -> Verdict {
        if !self.passed() {
            Verdict::Error
        } else if self.checks.iter().any(|c| c.status == Status::Warn) {
            Verdict::Degraded
        } else {
            Verdict::Ok
        }
    }

    /// 0 OK, 4 DEGRADED, 1 ERROR (see the module docs).
    pub fn exit_code(&self) -> i32 {
        self.verdict().exit_code()
    }

    /// Prints the last line, `STATUS: OK|DEGRADED|ERROR`.
    pub fn finish(&self, out: &mut dyn Write) {
        let _ = writeln!(out, "STATUS: {}", self.verdict().name());
        let _ = out.flush();
    }

    /// Records a check and prints its line at once, so that a slow check shows
    /// what already passed. Output errors (a closed pipe) are ignored: the
    /// report still decides the exit code.
    pub fn record(
        &mut self,
        out: &mut dyn Write,
        status: Status,
        name: impl Into<String>,
        detail: impl Into<String>,
    ) {
        let check = Check {
            status,
            name: name.into(),
            detail: detail.into(),
        };
        let _ = if check.detail.is_empty() {
            writeln!(out, "{status} {}", check.name)
        } else {
            writeln!(out, "{status} {}: {}", check.name, check.detail)
        };
        let _ = out.flush();
        self.checks.push(check);
    }
}

/// The overall result of a doctor run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    Degraded,
    Error,
}

impl Verdict {
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Ok => "OK",
            Verdict::Degraded => "DEGRADED",
            Verdict::Error => "ERROR",
        }
    }

    pub fn exit_code(self) -> i32 {
        match self {
            Verdict::Ok => 0,
            Verdict::Error => 1,
            Verdict::Degraded => 4,
        }
    }
}

/// Runs every check against the configured bucket, with retries short enough
/// that a dead endpoint is reported within seconds.
pub async fn run(cfg: &Config, out: &mut dyn Write) -> DoctorReport {
    let store = S3Store::new(&cfg.s3, S3Options::interactive());
    run_with_store(cfg, &store, out).await
}

/// [`run`] against any store (tests, or a store the caller already has).
pub async fn run_with_store(
    cfg: &Config,
    store: &dyn ObjectStore,
    out: &mut dyn Write,
) -> DoctorReport {
    let mut report = DoctorReport::default();
    check_config(cfg, &mut report, out);
    check_remote(cfg, store, &mut report, out).await;
    report
}

/// Bucket, credentials, conditional writes and the lease; returns the lease.
async fn check_remote(
    cfg: &Config,
    store: &dyn ObjectStore,
    report: &mut DoctorReport,
    out: &mut dyn Write,
) -> Option<Lease> {
    let layout = cfg.layout();
    if check_bucket(cfg, store, &layout, report, out).await {
        check_conditional_writes(store, &layout, report, out).await;
        check_lease(cfg, store, &layout, report, out).await
    } else {
        report.record(
            out,
            Status::Skip,
            "conditional writes, lease",
            "need a reachable bucket",
        );
        None
    }
}

/// This machine's side of `doctor`: where to look.
#[derive(Debug, Clone)]
pub struct Local {
    /// The mount directory (`~/.claude-mem`).
    pub dir: PathBuf,
    /// The home holding `.claude/settings.json` and `.config/systemd/user`.
    pub home: Option<PathBuf>,
}

/// Everything: the bucket checks of [`run`], then identity, mount, role,
/// databases, replication and what is installed, and the `STATUS:` line.
pub async fn run_full(cfg: &Config, local: &Local, out: &mut dyn Write) -> DoctorReport {
    let store = S3Store::new(&cfg.s3, S3Options::interactive());
    let mut report = DoctorReport::default();
    check_config(cfg, &mut report, out);
    report.record(
        out,
        Status::Ok,
        "identity",
        format!(
            "node {}, project {:?}, canonical_id {}, state dir {}",
            cfg.node_id,
            cfg.project_id,
            cfg.canonical_id,
            cfg.state_dir.display()
        ),
    );
    let lease = check_remote(cfg, &store, &mut report, out).await;
    let doc = check_mount(&local.dir, &mut report, out);
    check_role(cfg, lease.as_ref(), doc.as_ref(), &mut report, out);
    check_databases(cfg, &local.dir, doc.is_some(), &mut report, out);
    if let Some(doc) = &doc {
        check_replication(doc, &mut report, out);
    }
    if let Some(doc) = &doc {
        // The lease line says it already, from the bucket itself.
        for c in doc
            .coexistence
            .iter()
            .filter(|c| !c.starts_with("the lease"))
        {
            report.record(out, Status::Warn, "old tool", c.as_str());
        }
    }
    check_legacy(cfg, &store, doc.as_ref(), &mut report, out).await;
    check_set_aside(cfg, &mut report, out);
    check_installed(local.home.as_deref(), &mut report, out);
    report.finish(out);
    report
}

fn check_mount(
    dir: &Path,
    report: &mut DoctorReport,
    out: &mut dyn Write,
) -> Option<crate::status::StatusDoc> {
    use crate::fs::mount::{state, MountState};
    let shown = dir.display();
    if !dir.exists() {
        report.record(
            out,
            Status::Warn,
            "mount",
            format!(
                "{shown} does not exist (create it, or name the directory: membridge doctor DIR)"
            ),
        );
        return None;
    }
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    match state(&dir) {
        MountState::NotMounted => {
            report.record(
                out,
                Status::Warn,
                "mount",
                format!("{shown} is not mounted: nothing is replicated (membridge mount {shown})"),
            );
            None
        }
        MountState::Stale => {
            report.record(
                out,
                Status::Fail,
                "mount",
                format!("{shown} is a stale mount (its daemon is gone: Transport endpoint is not connected); run membridge mount {shown} again"),
            );
            None
        }
        MountState::Foreign => {
            report.record(
                out,
                Status::Fail,
                "mount",
                format!("{shown} has another filesystem mounted over it, not membridge"),
            );
            None
        }
        MountState::Live => match crate::daemon::read_status(&dir) {
            Ok(doc) => {
                let status = if doc.state == "ready" {
                    Status::Ok
                } else {
                    Status::Warn
                };
                let log = doc
                    .log_file
                    .as_deref()
                    .map(|l| format!(", log {l}"))
                    .unwrap_or_default();
                report.record(
                    out,
                    status,
                    "mount",
                    format!(
                        "{shown} mounted by membridge {} (pid {}, {}, since {}){log}",
                        doc.version, doc.pid, doc.state, doc.started_at
                    ),
                );
                check_passthrough(&doc.io, report, out);
                Some(doc)
            }
            Err(e) => {
                report.record(
                    out,
                    Status::Fail,
                    "mount",
                    format!("{shown} is mounted but its status is unreadable: {e:#}"),
                );
                None
            }
        },
    }
}

/// Kernel passthrough (docs/ARCHITECTURE.md, "Passthrough"): off is not
/// an error, only slower; the reason says what to change.
fn check_passthrough(
    io: &crate::fs::iomode::IoDoc,
    report: &mut DoctorReport,
    out: &mut dyn Write,
) {
    let detail = match io.passthrough.as_str() {
        "on" => format!(
            "on: the kernel serves local paths from the backing files ({} opens so far)",
            io.kernel_opens
        ),
        other => format!(
            "{other}: every read and write goes through the daemon ({})",
            io.passthrough_off_reason
                .as_deref()
                .unwrap_or("no reason given")
        ),
    };
    report.record(out, Status::Info, "passthrough", detail);
    if !io.durability.is_empty() {
        let dbs: Vec<String> = io
            .databases
            .iter()
            .map(|(db, mode)| format!("{db}: {mode}"))
            .collect();
        let detail = match io.durability.as_str() {
            "local" => format!(
                "local: a commit is acknowledged on this disk and published within about a second{}",
                if dbs.is_empty() {
                    String::new()
                } else {
                    format!(" (served by: {})", dbs.join(", "))
                }
            ),
            other => other.to_string(),
        };
        report.record(out, Status::Info, "durability", detail);
    }
}

fn check_role(
    cfg: &Config,
    lease: Option<&Lease>,
    doc: Option<&crate::status::StatusDoc>,
    report: &mut DoctorReport,
    out: &mut dyn Write,
) {
    let Some(doc) = doc else {
        let detail = match lease {
            Some(l) if l.primary_node_id == cfg.node_id => {
                "not mounted; the lease names this node, so it would mount as the primary".into()
            }
            Some(l) => format!(
                "not mounted; it would follow {} as a secondary",
                l.primary_node_id
            ),
            None => "not mounted".to_string(),
        };
        report.record(out, Status::Info, "role", detail);
        return;
    };
    let epoch = doc
        .epoch
        .map(|e| format!(", epoch {e}"))
        .unwrap_or_default();
    let primary = doc.primary.as_deref().unwrap_or("none");
    let mut status = match doc.role.as_str() {
        "primary" | "secondary" => Status::Ok,
        _ => Status::Warn, // catching-up, fenced, handing-over: in between
    };
    let mut detail = if doc.role == "primary" {
        format!("primary{epoch}, policy {}", doc.policy)
    } else {
        format!(
            "{}{epoch}, primary {primary}, policy {}",
            doc.role, doc.policy
        )
    };
    if let Some(l) = lease {
        let lease_mine = l.primary_node_id == cfg.node_id && !l.is_released();
        if (doc.role == "primary") != lease_mine && cfg.policy != Policy::Disabled {
            status = Status::Warn;
            detail += &format!(
                "; but the lease says {} (changing hands? run doctor again)",
                l.describe()
            );
        }
    }
    report.record(out, status, "role", detail);
}

/// Replicated databases under `dir` (through the mount when mounted).
fn check_databases(
    cfg: &Config,
    dir: &Path,
    mounted: bool,
    report: &mut DoctorReport,
    out: &mut dyn Write,
) {
    let mut names = Vec::new();
    let root = format!("{}/", dir.display());
    for pattern in &cfg.classes.databases {
        let full = format!("{}{pattern}", glob::Pattern::escape(&root));
        for p in glob::glob(&full).into_iter().flatten().flatten() {
            if let Some(rel) = p.to_str().and_then(|s| s.strip_prefix(&root)) {
                names.push(rel.to_string());
            }
        }
    }
    names.sort();
    names.dedup();
    if names.is_empty() {
        report.record(
            out,
            Status::Info,
            "databases",
            format!(
                "none in {} yet (MEMBRIDGE_REPLICATE={})",
                dir.display(),
                cfg.classes.databases.join(",")
            ),
        );
    }
    for name in names {
        let path = dir.join(&name);
        let (status, detail) = match db_health(&path, mounted) {
            Ok(d) => (Status::Ok, d),
            Err(d) => (Status::Fail, d),
        };
        report.record(out, status, format!("db {name}"), detail);
    }
}

fn db_health(path: &Path, mounted: bool) -> Result<String, String> {
    use crate::replica::legacy;
    let conn = if mounted {
        legacy::open_ro(path)
    } else {
        legacy::open_quiet(path)
    }
    .map_err(|e| format!("cannot open read-only: {e}"))?;
    let problems: Vec<String> = conn
        .prepare("PRAGMA integrity_check(3)")
        .and_then(|mut st| {
            st.query_map([], |r| r.get::<_, String>(0))?
                .collect::<rusqlite::Result<Vec<_>>>()
        })
        .map_err(|e| format!("integrity_check could not run: {e}"))?;
    if problems != ["ok"] {
        return Err(format!("integrity_check: {}", problems.join("; ")));
    }
    let stats = legacy::stats(&conn).map_err(|e| format!("counting rows: {e}"))?;
    let pages: (i64, i64) = conn
        .query_row("PRAGMA page_count", [], |r| r.get(0))
        .and_then(|n| Ok((n, conn.query_row("PRAGMA page_size", [], |r| r.get(0))?)))
        .unwrap_or((0, 0));
    Ok(format!(
        "integrity ok, {} ({} pages of {} bytes)",
        stats.describe(),
        pages.0,
        pages.1
    ))
}

/// Lag and backlog from the daemon's status.
fn check_replication(
    doc: &crate::status::StatusDoc,
    report: &mut DoctorReport,
    out: &mut dyn Write,
) {
    const LAG_WARN_SECONDS: f64 = 60.0;
    let primary = doc.role == "primary" || doc.role == "handing-over";
    for (name, d) in &doc.databases {
        let (mut status, mut detail) = if primary {
            (
                Status::Ok,
                format!(
                    "head txid {}, uploaded {}, backlog {} transaction(s)",
                    d.head_txid, d.uploaded_txid, d.backlog
                ),
            )
        } else {
            let lag = d
                .lag_seconds
                .map(|l| format!("{l:.1}s"))
                .unwrap_or("-".into());
            let behind = d.lag_seconds.is_some_and(|l| l > LAG_WARN_SECONDS);
            (
                if behind { Status::Warn } else { Status::Ok },
                format!(
                    "applied txid {} of {}, lag {lag}",
                    d.applied_txid, d.head_txid
                ),
            )
        };
        if primary && doc.upload_state != "ok" {
            status = Status::Warn;
            let since = doc
                .last_outage
                .as_ref()
                .map(|o| format!(" since {}", o.from))
                .unwrap_or_default();
            detail += &format!(
                "; bucket {}{since}: writes go on locally, the backlog uploads when it returns",
                doc.upload_state
            );
        }
        if d.refused_writes > 0 && !primary {
            // Expected on a secondary, so no warning; but a user whose client
            // could not write here should read why, and where writes go.
            detail += &format!(
                "; {} write transaction(s) refused here (last {}): writes go to {}; \
                 `membridge leadership select {}` moves the lease here",
                d.refused_writes,
                d.last_refused.as_deref().unwrap_or("-"),
                doc.primary.as_deref().unwrap_or("the primary"),
                doc.node_id
            );
        }
        if let Some(e) = &d.last_error {
            status = Status::Warn;
            detail += &format!("; last error: {e}");
        }
        report.record(out, status, format!("replication {name}"), detail);
    }
    if let Some(e) = &doc.last_error {
        report.record(out, Status::Warn, "daemon last error", e.as_str());
    }
}

/// Databases set aside under the state dir, mounted or not
/// (`replica::aside`): a divergent tail (transactions acknowledged on this
/// node that the bucket's history does not have) or this node's own database
/// that the bucket's copy replaced. Each is a warning until merged back or
/// dismissed; resolved ones are listed for the record.
fn check_set_aside(cfg: &Config, report: &mut DoctorReport, out: &mut dyn Write) {
    use crate::replica::aside::{self, Kind};
    let all = aside::scan(&cfg.state_dir);
    for e in all.iter().filter(|e| e.outstanding()) {
        let name = match e.kind {
            Kind::Divergent => "divergent copy",
            Kind::Replaced => "set-aside copy",
        };
        report.record(
            out,
            Status::Warn,
            name,
            format!(
                "{}; its rows are not in claude-mem until merged: {}",
                e.describe(),
                e.commands()
            ),
        );
    }
    let resolved: Vec<String> = all
        .iter()
        .filter_map(|e| {
            let r = e.resolution.as_ref()?;
            Some(format!("{} ({} {})", e.key().display(), r.how, r.at))
        })
        .collect();
    if !resolved.is_empty() {
        report.record(
            out,
            Status::Info,
            "set-aside copies resolved",
            format!(
                "{}; delete them when you no longer want them",
                resolved.join(", ")
            ),
        );
    }
}

/// Mount helper, systemd units, the Claude hook: informational, except the
/// old tool's hooks still installed next to membridge (they would overwrite
/// the mounted database).
fn check_installed(home: Option<&Path>, report: &mut DoctorReport, out: &mut dyn Write) {
    let helper = [
        "/sbin/mount.fuse.membridge",
        "/usr/sbin/mount.fuse.membridge",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists());
    report.record(
        out,
        Status::Info,
        "mount helper",
        match helper {
            Some(p) => p.to_string(),
            None => "not installed (optional: mount-scripts/ for fstab and systemd)".into(),
        },
    );
    let mut dirs: Vec<PathBuf> = [
        "/etc/systemd/system",
        "/usr/lib/systemd/system",
        "/lib/systemd/system",
        "/etc/systemd/user",
        "/usr/lib/systemd/user",
    ]
    .iter()
    .map(PathBuf::from)
    .collect();
    if let Some(h) = home {
        dirs.push(h.join(".config/systemd/user"));
    }
    let mut units = Vec::new();
    for d in dirs {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let unit = name.ends_with(".service") || name.ends_with(".mount");
            let ours = name.starts_with("membridge")
                || (unit
                    && std::fs::read_to_string(e.path()).is_ok_and(|t| {
                        t.contains("fuse.membridge") || t.contains("membridge mount")
                    }));
            if unit && ours {
                units.push(e.path().display().to_string());
            }
        }
    }
    report.record(
        out,
        Status::Info,
        "systemd units",
        if units.is_empty() {
            "none installed (optional)".to_string()
        } else {
            units.join(", ")
        },
    );
    let settings = home.map(|h| h.join(".claude/settings.json"));
    let text = settings
        .as_ref()
        .and_then(|p| std::fs::read_to_string(p).ok());
    let Some(text) = text else {
        report.record(
            out,
            Status::Info,
            "Claude hook",
            "no ~/.claude/settings.json: nothing makes sure the mount is up before claude starts (see mount-scripts/)",
        );
        return;
    };
    let shown = settings
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let session_start = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v.get("hooks").and_then(|h| h.get("SessionStart")).cloned())
        .map(|v| v.to_string())
        .unwrap_or_default();
    report.record(
        out,
        Status::Info,
        "Claude hook",
        if session_start.contains("membridge") {
            format!("a SessionStart hook in {shown} mentions membridge")
        } else {
            format!("no SessionStart hook in {shown} mentions membridge (see mount-scripts/)")
        },
    );
    const OLD_HOOKS: [&str; 7] = [
        "claude-mem-hook-pull",
        "claude-mem-hook-push",
        "claude-mem-pull",
        "claude-mem-push",
        "sqlite_minio_sync",
        "cm-pull",
        "cm-push",
    ];
    let old: Vec<&str> = OLD_HOOKS.into_iter().filter(|h| text.contains(h)).collect();
    if !old.is_empty() {
        report.record(
            out,
            Status::Warn,
            "old tool's hooks",
            format!(
                "{shown} still runs {}: remove them on a machine that mounts with membridge, or they overwrite the database under it (docs/MIGRATION.md)",
                old.join(", ")
            ),
        );
    }
}

fn check_config(cfg: &Config, report: &mut DoctorReport, out: &mut dyn Write) {
    let policy = match &cfg.policy {
        Policy::Pinned { primary } => format!("pinned (primary {primary})"),
        Policy::Auto { candidate: true } => "auto (this node is a candidate)".into(),
        Policy::Auto { candidate: false } => "auto (this node never takes the lease)".into(),
        Policy::Follow { idle_s } => {
            format!("follow (a session here asks a primary idle for {idle_s} s to hand over)")
        }
        Policy::Disabled => "disabled".into(),
    };
    let file = match &cfg.config_file {
        Some(p) if p.exists() => format!(", config file {}", p.display()),
        Some(p) => format!(", no config file at {}", p.display()),
        None => String::new(),
    };
    let detail = format!(
        "endpoint {}, bucket {}, region {}, project {:?} -> canonical_id {}, node {}, policy {policy}{file}",
        cfg.s3.endpoint, cfg.s3.bucket, cfg.s3.region, cfg.project_id, cfg.canonical_id, cfg.node_id
    );
    report.record(out, Status::Ok, "config", detail);
    if cfg.policy == Policy::Disabled {
        report.record(
            out,
            Status::Warn,
            "leadership disabled",
            "LEADERSHIP_ENABLED=0: this node writes without a lease; you must make sure no other node writes",
        );
    }
}

/// Reachability, credentials and bucket existence, from one listing. Returns
/// whether the bucket is usable.
async fn check_bucket(
    cfg: &Config,
    store: &dyn ObjectStore,
    layout: &Layout,
    report: &mut DoctorReport,
    out: &mut dyn Write,
) -> bool {
    let at = store.describe();
    let bucket = &cfg.s3.bucket;
    let result = store.check_bucket(layout.prefix()).await;
    if let Err(StoreError::Unreachable {
        attempts,
        elapsed_ms,
        detail,
        ..
    }) = &result
    {
        report.record(
            out,
            Status::Fail,
            "bucket unreachable",
            format!(
                "{at}: {detail} ({attempts} attempts over {elapsed_ms} ms; check MINIO_ENDPOINT and that the server is up)"
            ),
        );
        report.record(
            out,
            Status::Skip,
            "credentials, bucket",
            "endpoint unreachable",
        );
        return false;
    }
    report.record(out, Status::Ok, "bucket reachable", at);
    match result {
        Ok(()) => {
            report.record(out, Status::Ok, "credentials accepted", "");
            report.record(out, Status::Ok, "bucket exists", bucket.as_str());
            true
        }
        Err(StoreError::AccessDenied { code, message, .. }) if code == "RequestTimeTooSkewed" => {
            report.record(
                out,
                Status::Fail,
                "clock skew",
                format!(
                    "{code}: {message} (synchronise this machine's clock; the lease depends on it)"
                ),
            );
            false
        }
        Err(StoreError::AccessDenied { code, message, .. }) => {
            report.record(
                out,
                Status::Fail,
                "credentials rejected",
                format!(
                    "{code}: {message} (check MINIO_ACCESS_KEY and MINIO_SECRET_KEY, and that they may list bucket {bucket})"
                ),
            );
            false
        }
        Err(StoreError::NoSuchBucket { .. }) => {
            report.record(out, Status::Ok, "credentials accepted", "");
            report.record(
                out,
                Status::Fail,
                "bucket missing",
                format!(
                    "bucket {bucket:?} does not exist on {} (create it, or fix MINIO_BUCKET)",
                    cfg.s3.endpoint
                ),
            );
            false
        }
        Err(e) => {
            report.record(out, Status::Fail, "bucket check failed", e.to_string());
            false
        }
    }
}

/// Proves on a throwaway key that the server honours `If-None-Match: *` and
/// `If-Match`: without them two nodes could both believe they hold the lease.
async fn check_conditional_writes(
    store: &dyn ObjectStore,
    layout: &Layout,
    report: &mut DoctorReport,
    out: &mut dyn Write,
) {
    let key = layout.doctor_probe(&format!("{:016x}", rand::random::<u64>()));
    let body = |s: &'static str| Bytes::from_static(s.as_bytes());
    let name = "conditional writes";
    let first = match store.put(&key, body("probe 1"), PutMode::CreateOnly).await {
        Ok(etag) => etag,
        Err(e) => {
            report.record(
                out,
                Status::Fail,
                name,
                format!("cannot create probe object: {e}"),
            );
            return;
        }
    };
    let outcome = probe_conditions(store, &key, &first).await;
    let cleanup = store.delete(&key).await;
    match outcome {
        Ok(()) => report.record(
            out,
            Status::Ok,
            "conditional writes enforced",
            format!("If-None-Match: * and If-Match (probe {key})"),
        ),
        Err(why) => report.record(out, Status::Fail, name, why),
    }
    if let Err(e) = cleanup {
        report.record(
            out,
            Status::Warn,
            "probe cleanup",
            format!("could not delete {key}: {e}"),
        );
    }
}

async fn probe_conditions(store: &dyn ObjectStore, key: &str, etag: &str) -> Result<(), String> {
    let body = |s: &'static str| Bytes::from_static(s.as_bytes());
    let ignored = |what: &str| {
        format!(
            "the server ignored {what}, so two nodes could both take the lease; use a server that supports conditional writes (MinIO, AWS S3, SeaweedFS)"
        )
    };
    match store.put(key, body("probe 2"), PutMode::CreateOnly).await {
        Err(StoreError::PreconditionFailed { .. }) => {}
        Ok(_) => return Err(ignored("If-None-Match: * on an existing object")),
        Err(e) => return Err(format!("second create-if-absent: {e}")),
    }
    let wrong = PutMode::IfMatch("\"00000000000000000000000000000000\"".into());
    match store.put(key, body("probe 3"), wrong).await {
        Err(StoreError::PreconditionFailed { .. }) => {}
        Ok(_) => return Err(ignored("If-Match with a wrong ETag")),
        Err(e) => return Err(format!("If-Match with a wrong ETag: {e}")),
    }
    match store
        .put(key, body("probe 4"), PutMode::IfMatch(etag.to_string()))
        .await
    {
        Ok(_) => Ok(()),
        Err(e) => Err(format!("If-Match with the current ETag was refused: {e}")),
    }
}

/// What the lease says, without judging whether this node should hold it (that
/// is the lease module's job).
async fn check_lease(
    cfg: &Config,
    store: &dyn ObjectStore,
    layout: &Layout,
    report: &mut DoctorReport,
    out: &mut dyn Write,
) -> Option<Lease> {
    let key = layout.lease();
    let got = match store.get(&key).await {
        Ok(g) => g,
        Err(StoreError::NotFound { .. }) => {
            let detail = if cfg.policy == Policy::Disabled {
                "none (leadership disabled)"
            } else {
                "none yet (the first eligible node to mount takes it)"
            };
            report.record(out, Status::Ok, "lease", detail);
            return None;
        }
        Err(e) => {
            report.record(out, Status::Fail, "lease", e.to_string());
            return None;
        }
    };
    // The lease module's parser: doctor and the daemon cannot disagree on what
    // a valid lease is.
    let lease = match Lease::parse(&key, &got.body, &cfg.canonical_id) {
        Ok(l) => l,
        Err(e) => {
            report.record(out, Status::Fail, "lease", e.to_string());
            return None;
        }
    };
    let (primary, epoch) = (lease.primary_node_id.as_str(), lease.epoch);
    let secs = lease.remaining(Utc::now()).num_seconds();
    let expiry = if let Some(by) = lease.released_by() {
        format!("released by {by}")
    } else if secs >= 0 {
        format!("expires in {secs}s")
    } else {
        format!("expired {}s ago", -secs)
    };
    let mine = if primary == cfg.node_id {
        " (this node)"
    } else {
        ""
    };
    // An old-tool holder never publishes membridge history: following it
    // looks healthy (lag 0) while nothing moves (docs/ARCHITECTURE.md,
    // "Living beside the old tool").
    let now = Utc::now();
    let old_tool = crate::coexist::old_tool_holder(store, layout, &lease, now)
        .await
        .unwrap_or(false);
    let (status, why) = if old_tool && secs >= 0 {
        (
            Status::Warn,
            format!(
                "; {}",
                crate::coexist::describe_old_holder(&lease, now, &cfg.node_id)
            ),
        )
    } else if old_tool {
        (
            Status::Ok,
            format!(
                "; {}",
                crate::coexist::describe_old_holder(&lease, now, &cfg.node_id)
            ),
        )
    } else {
        (Status::Ok, String::new())
    };
    report.record(
        out,
        status,
        "lease",
        format!("primary {primary}{mine}, epoch {epoch}, {expiry}{why}"),
    );
    Some(lease)
}

/// The old tool's copy (`sqlite/`), if kept: who wrote it, how old it is,
/// and whether the old tool wrote it after membridge took the project over
/// (an old-tool push beside membridge, or a rollback: then membridge's head
/// is not the newest data, and a mount would serve the older copy).
async fn check_legacy(
    cfg: &Config,
    store: &dyn ObjectStore,
    doc: Option<&crate::status::StatusDoc>,
    report: &mut DoctorReport,
    out: &mut dyn Write,
) {
    use crate::coexist;
    let layout = cfg.layout();
    let seen = match coexist::read_legacy(store, &layout).await {
        Ok(Some(s)) => s,
        Ok(None) => return,
        Err(e) => {
            report.record(out, Status::Warn, "legacy copy", e.to_string());
            return;
        }
    };
    let f = &seen.fields;
    let manifest = crate::replica::manifest::load(store, &layout, &cfg.canonical_id)
        .await
        .ok()
        .flatten()
        .map(|v| v.manifest);
    let who = format!(
        "{} written by {} at {}",
        layout.legacy_db(),
        f.source_host.as_deref().unwrap_or("?"),
        f.timestamp.as_deref().unwrap_or("?")
    );
    let Some(m) = manifest else {
        report.record(
            out,
            Status::Info,
            "legacy copy",
            format!("{who}: the old tool's; not migrated yet (membridge migrate)"),
        );
        return;
    };
    let adopted = m.adopted.as_ref().map(|a| a.sha256.as_str());
    if coexist::is_foreign(f, adopted) {
        let newer = coexist::newer_than_head(f, &m.updated_at);
        let detail = if newer {
            format!(
                "{who} by the old tool, NEWER than membridge's head (manifest updated by {} at {}):                  the project was rolled back to the old tool, or an old-tool node pushes beside                  membridge; the rows written there are not in membridge's history, and a mount                  serves the older copy. After a rollback, do not mount: to come back, delete                  manifest.json and db/ and run `membridge migrate` again (docs/MIGRATION.md);                  otherwise a mounted node keeps the copy aside for `membridge merge`",
                m.updated_by, m.updated_at
            )
        } else {
            format!(
                "{who} by the old tool, not by membridge: an old-tool node pushes beside membridge                  (LEADERSHIP_ENABLED=0 or ALLOW_SECONDARY_PUSH=1 there); a mounted node keeps the                  copy aside for `membridge merge` before the primary replaces it"
            )
        };
        report.record(out, Status::Warn, "legacy copy", detail);
        return;
    }
    let txid = f
        .membridge_txid
        .map(|t| format!(", txid {t}"))
        .unwrap_or_else(|| " (the snapshot migrate adopted)".into());
    let age = f
        .timestamp
        .as_deref()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| {
            format!(
                ", {} s old",
                (Utc::now() - t.with_timezone(&Utc)).num_seconds()
            )
        })
        .unwrap_or_default();
    let mut status = Status::Ok;
    let mut detail = format!("{who}{txid}{age}");
    if let Some(l) = doc.and_then(|d| d.legacy.as_ref()) {
        if let Some(behind) = l.age_seconds {
            detail += &format!(
                "; behind the head for {behind:.0} s (refreshed within {} s of a change)",
                l.refresh_seconds
            );
            if behind > (l.refresh_seconds + 30) as f64 {
                status = Status::Warn;
                detail += ": overdue, see the daemon's log";
            }
        }
    }
    report.record(out, status, "legacy copy", detail);
}
