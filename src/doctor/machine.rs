//! This machine's side of `doctor`: the mount and its status, passthrough,
//! the role, each replicated database, replication lag and backlog, copies
//! set aside, and what is installed.

use super::*;

pub(super) fn check_mount(
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
pub(super) fn check_passthrough(
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

pub(super) fn check_role(
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
pub(super) fn check_databases(
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

pub(super) fn db_health(path: &Path, mounted: bool) -> Result<String, String> {
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
pub(super) fn check_replication(
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
pub(super) fn check_set_aside(cfg: &Config, report: &mut DoctorReport, out: &mut dyn Write) {
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
pub(super) fn check_installed(home: Option<&Path>, report: &mut DoctorReport, out: &mut dyn Write) {
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
