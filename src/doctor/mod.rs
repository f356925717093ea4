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

mod bucket;
mod machine;

use bucket::*;
use machine::*;
