//! The bucket's side of `doctor`: reachability and credentials, the
//! conditional writes the lease and manifest need, the lease, and the old
//! tool's objects.

use super::*;

/// Reachability, credentials and bucket existence, from one listing. Returns
/// whether the bucket is usable.
pub(super) async fn check_bucket(
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
pub(super) async fn check_conditional_writes(
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

pub(super) async fn probe_conditions(
    store: &dyn ObjectStore,
    key: &str,
    etag: &str,
) -> Result<(), String> {
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
pub(super) async fn check_lease(
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
pub(super) async fn check_legacy(
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
