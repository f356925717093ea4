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

use std::fmt;
use std::io::Write;

use bytes::Bytes;
use chrono::Utc;

use crate::config::{Config, Policy};
use crate::lease::Lease;
use crate::remote::{Layout, ObjectStore, PutMode, S3Options, S3Store, StoreError};

/// The outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
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

    /// 0 when every check passed, 1 otherwise (DESIGN §6).
    pub fn exit_code(&self) -> i32 {
        if self.passed() {
            0
        } else {
            1
        }
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
    let layout = Layout::for_config(cfg);
    if check_bucket(cfg, store, &layout, &mut report, out).await {
        check_conditional_writes(store, &layout, &mut report, out).await;
        check_lease(cfg, store, &layout, &mut report, out).await;
    } else {
        report.record(
            out,
            Status::Skip,
            "conditional writes, lease",
            "need a reachable bucket",
        );
    }
    report
}

fn check_config(cfg: &Config, report: &mut DoctorReport, out: &mut dyn Write) {
    let policy = match &cfg.policy {
        Policy::Pinned { primary } => format!("pinned (primary {primary})"),
        Policy::Auto { candidate: true } => "auto (this node is a candidate)".into(),
        Policy::Auto { candidate: false } => "auto (this node never takes the lease)".into(),
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
) {
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
            return;
        }
        Err(e) => {
            report.record(out, Status::Fail, "lease", e.to_string());
            return;
        }
    };
    // The lease module's parser: doctor and the daemon cannot disagree on what
    // a valid lease is.
    let lease = match Lease::parse(&key, &got.body, &cfg.canonical_id) {
        Ok(l) => l,
        Err(e) => {
            report.record(out, Status::Fail, "lease", e.to_string());
            return;
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
    report.record(
        out,
        Status::Ok,
        "lease",
        format!("primary {primary}{mine}, epoch {epoch}, {expiry}"),
    );
}
