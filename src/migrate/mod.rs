//! `membridge migrate [--dry-run]`: adopt a project that the old hook-based
//! tool left in the bucket (`sqlite/claude-mem.db`, its `.sha256` and the old
//! `manifest.json`, and maybe its `leadership/lease.json`).
//!
//! The verified legacy image becomes membridge's first snapshot (generation 1,
//! txid 0) and the manifest is created from it with `If-None-Match: *`, at the
//! old lease's epoch; the lease itself is left alone, and so are the legacy
//! objects (old-tool nodes keep pulling them; membridge's snapshots keep them
//! current). On this machine the local journal, the base image and the
//! database file are seeded with the same image, so that the next `mount`
//! continues that history instead of starting a new generation. The local
//! database is backed up first (`VACUUM INTO` under the state directory), and
//! replaced only when it holds the same content as the bucket's copy (or with
//! `--replace-local`).
//!
//! Every step is decided from what is already there, so a second run finds
//! nothing to do and changes nothing; a run interrupted half-way is completed
//! by the next one. `--dry-run` reads everything (and verifies the download)
//! but writes nothing, in the bucket or locally.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::config::Config;
use crate::fs::mount::{self, MountState};
use crate::journal::base::base_path;
use crate::journal::codec::{SnapshotMeta, SnapshotReader, SnapshotWriter};
use crate::journal::{DbHead, Journal};
use crate::lease::Lease;
use crate::remote::keys::LEGACY_DB_NAME;
use crate::remote::{Layout, ObjectStore, PutMode, StoreError};
use crate::replica::legacy::{self, parse_sha256_file, ImageStats};
use crate::replica::manifest::{
    self, hex64, Adoption, DbManifest, EpochStart, Manifest, SnapshotRef, Versioned,
};
use crate::sqlite::checksum::PageHashes;
use crate::sqlite::header::DbHeader;

/// The database the old tool replicated; the only one migrate adopts.
pub const DB: &str = LEGACY_DB_NAME;
/// An adopted history starts like a first capture: generation 1 at txid 0.
const SEED_GENERATION: u64 = 1;
pub const SEED_TXID: u64 = 0;
const CHUNK: u64 = 8 << 20;

pub struct Options {
    /// The directory that will be mounted (`~/.claude-mem`).
    pub dir: PathBuf,
    pub dry_run: bool,
    /// Replace a local database whose content differs from the bucket's copy
    /// (it is backed up first).
    pub replace_local: bool,
    /// Progress bars on stderr (only drawn on a terminal).
    pub progress: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The project was adopted (or the local part of an earlier adoption completed).
    Adopted,
    /// Already done; the message says why.
    NothingToDo(String),
    /// `--dry-run`: the steps were printed, nothing was changed.
    DryRun,
}

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("no legacy snapshot to adopt: {key} does not exist in bucket {bucket} (project {project:?} -> canonical id {cid}; check CLAUDE_PROJECT_ID and MINIO_BUCKET)")]
    NoLegacy {
        key: String,
        bucket: String,
        project: String,
        cid: String,
    },
    #[error("sha256 mismatch: {key} hashes to {got}, {sha_key} says {want} (an interrupted or corrupt upload: push again with the old tool, then migrate)")]
    ShaMismatch {
        key: String,
        sha_key: String,
        got: String,
        want: String,
    },
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Sqlite {
        what: String,
        source: rusqlite::Error,
    },
    #[error("{0}")]
    Other(String),
}

type Result<T> = std::result::Result<T, MigrateError>;

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> MigrateError {
    let what = what.into();
    move |source| MigrateError::Io { what, source }
}

fn sql(what: impl Into<String>) -> impl FnOnce(rusqlite::Error) -> MigrateError {
    let what = what.into();
    move |source| MigrateError::Sqlite { what, source }
}

/// Prints one step: done, or with `--dry-run` what would be done.
struct Say<'a> {
    out: &'a mut dyn Write,
    dry_run: bool,
}

impl Say<'_> {
    fn info(&mut self, line: impl AsRef<str>) {
        let _ = writeln!(self.out, "migrate: {}", line.as_ref());
        let _ = self.out.flush();
    }

    /// A step that changes something.
    fn step(&mut self, line: impl AsRef<str>) {
        let prefix = if self.dry_run { "would " } else { "" };
        let _ = writeln!(self.out, "migrate: {prefix}{}", line.as_ref());
        let _ = self.out.flush();
    }
}

/// What the bucket holds for the project.
struct Bucket {
    manifest: Option<Versioned>,
    lease: Option<Lease>,
    legacy_size: Option<u64>,
    legacy_sha: Option<String>,
    legacy_manifest: Option<legacy::LegacyManifestFields>,
}

async fn read_bucket(store: &dyn ObjectStore, layout: &Layout, cfg: &Config) -> Result<Bucket> {
    let manifest = manifest::load(store, layout, &cfg.canonical_id)
        .await
        .map_err(|e| match e {
            manifest::ManifestError::Store(s) => MigrateError::Store(s),
            other => MigrateError::Conflict(format!(
                "{other} (a membridge manifest is there but cannot be used; nothing adopted)"
            )),
        })?;
    let lease = match store.get(&layout.lease()).await {
        Ok(g) => Some(
            Lease::parse(&layout.lease(), &g.body, &cfg.canonical_id)
                .map_err(|e| MigrateError::Refused(format!("{e} (fix or remove it first)")))?,
        ),
        Err(StoreError::NotFound { .. }) => None,
        Err(e) => return Err(e.into()),
    };
    let legacy_size = match store.head(&layout.legacy_db()).await {
        Ok(m) => Some(m.size),
        Err(StoreError::NotFound { .. }) => None,
        Err(e) => return Err(e.into()),
    };
    let legacy_sha = match store.get(&layout.legacy_sha256()).await {
        Ok(g) => Some(
            parse_sha256_file(&String::from_utf8_lossy(&g.body)).ok_or_else(|| {
                MigrateError::Refused(format!(
                    "{} holds no SHA-256 digest: cannot verify the legacy snapshot (push again with the old tool)",
                    layout.legacy_sha256()
                ))
            })?,
        ),
        Err(StoreError::NotFound { .. }) => None,
        Err(e) => return Err(e.into()),
    };
    let legacy_manifest = match store.get(&layout.legacy_manifest()).await {
        Ok(g) => Some(
            legacy::read_manifest(&layout.legacy_manifest(), &g.body).map_err(|e| {
                MigrateError::Refused(format!(
                    "{e} (push again with the old tool, or remove it, then migrate)"
                ))
            })?,
        ),
        Err(StoreError::NotFound { .. }) => None,
        Err(e) => return Err(e.into()),
    };
    Ok(Bucket {
        manifest,
        lease,
        legacy_size,
        legacy_sha,
        legacy_manifest,
    })
}

/// `membridge migrate`.
pub async fn run(
    cfg: &Config,
    store: &dyn ObjectStore,
    opts: &Options,
    out: &mut dyn Write,
) -> Result<Outcome> {
    let mut say = Say {
        out,
        dry_run: opts.dry_run,
    };
    let layout = cfg.layout();
    let replicated = cfg
        .classes
        .databases
        .iter()
        .any(|g| glob::Pattern::new(g).is_ok_and(|p| p.matches(DB)));
    if !replicated {
        return Err(MigrateError::Refused(format!(
            "{DB} is not replicated by this configuration (MEMBRIDGE_REPLICATE={}): add it before migrating",
            cfg.classes.databases.join(",")
        )));
    }
    say.info(format!(
        "project {:?} (canonical id {}), bucket {}, node {}, directory {}{}",
        cfg.project_id,
        cfg.canonical_id,
        cfg.s3.bucket,
        cfg.node_id,
        opts.dir.display(),
        if opts.dry_run {
            " — dry run: nothing will be changed"
        } else {
            ""
        }
    ));
    let b = read_bucket(store, &layout, cfg).await?;
    let journal_path = cfg.state_dir.join("journal.db");
    let local_head = Journal::peek_head(&journal_path, DB)
        .map_err(|e| MigrateError::Other(format!("{}: {e}", journal_path.display())))?;

    let mut complete_local_only = false;
    if let Some(v) = &b.manifest {
        let m = &v.manifest;
        let head = m.databases.get(DB);
        if let Some(lm) = b
            .legacy_manifest
            .as_ref()
            .filter(|lm| crate::coexist::newer_than_head(lm, &m.updated_at))
            .filter(|lm| {
                crate::coexist::is_foreign(lm, m.adopted.as_ref().map(|a| a.sha256.as_str()))
            })
        {
            say.info(format!(
                "WARNING: {} was pushed by the old tool ({} at {}) after membridge's head (manifest updated by {} at {}): the old tool has newer data than membridge (a rollback?); mounting serves membridge's older copy. To bring the old tool's data back into membridge, delete {} and {} and migrate again (docs/MIGRATION.md, \"Coming back after a rollback\")",
                layout.legacy_db(),
                lm.source_host.as_deref().unwrap_or("?"),
                lm.timestamp.as_deref().unwrap_or("?"),
                m.updated_by,
                m.updated_at,
                layout.manifest(),
                layout.db_prefix(DB)
            ));
        }
        let Some(a) = &m.adopted else {
            return Err(MigrateError::Conflict(format!(
                "{} already holds a membridge manifest with different content (epoch {}, {}, updated by {} at {}), not written by migrate: this project is on membridge already; nothing adopted (just mount)",
                layout.manifest(),
                m.epoch,
                head.map(|d| format!("{DB} at txid {} generation {}", d.head_txid, d.generation))
                    .unwrap_or_else(|| format!("no {DB}")),
                m.updated_by,
                m.updated_at
            )));
        };
        let at_seed = head.is_some_and(|d| {
            d.generation == SEED_GENERATION
                && d.head_txid == SEED_TXID
                && d.snapshot.as_ref().is_some_and(|s| s.txid == SEED_TXID)
        });
        let since = format!("adopted from {} by {} at {}", a.from_key, a.by, a.at);
        if local_head.is_some() {
            return Ok(nothing(
                &mut say,
                format!("already migrated ({since}) and this machine's state is seeded"),
            ));
        }
        if !at_seed || b.legacy_sha.as_deref() != Some(a.sha256.as_str()) {
            return Ok(nothing(
                &mut say,
                format!(
                    "already migrated ({since}); the bucket has moved on (at txid {}): this machine just mounts and follows it",
                    head.map_or(0, |d| d.head_txid)
                ),
            ));
        }
        say.info(format!(
            "already migrated ({since}), but this machine's state is not seeded yet: seeding it from the same snapshot"
        ));
        complete_local_only = true;
    }

    let (Some(size), Some(sha)) = (b.legacy_size, b.legacy_sha.clone()) else {
        if b.legacy_size.is_some() {
            return Err(MigrateError::Refused(format!(
                "{} is missing: cannot verify {} (push again with the old tool)",
                layout.legacy_sha256(),
                layout.legacy_db()
            )));
        }
        return Err(MigrateError::NoLegacy {
            key: layout.legacy_db(),
            bucket: cfg.s3.bucket.clone(),
            project: cfg.project_id.clone(),
            cid: cfg.canonical_id.clone(),
        });
    };
    let lm = b.legacy_manifest.as_ref();
    let lm_str = |field: fn(&legacy::LegacyManifestFields) -> &Option<String>| {
        lm.and_then(|m| field(m).as_deref())
    };
    if let Some(cid) = lm_str(|m| &m.canonical_id).filter(|c| *c != cfg.canonical_id) {
        return Err(MigrateError::Refused(format!(
            "{} belongs to canonical id {cid}, not {}: refusing to adopt another project's snapshot",
            layout.legacy_manifest(),
            cfg.canonical_id
        )));
    }
    say.info(format!(
        "legacy snapshot {} ({size} bytes, sha256 {}…){}",
        layout.legacy_db(),
        &sha[..12],
        match (lm_str(|m| &m.source_host), lm_str(|m| &m.timestamp)) {
            (Some(h), Some(t)) => format!(", pushed by {h} at {t}"),
            _ if lm.is_none() => format!(", no {} (not needed)", layout.legacy_manifest()),
            _ => String::new(),
        }
    ));
    let lease_epoch = b.lease.as_ref().map(|l| l.epoch);
    match &b.lease {
        Some(l) => {
            let mine = l.primary_node_id == cfg.node_id;
            let now = chrono::Utc::now();
            let left = l.remaining(now).num_seconds();
            // An expired (or released) lease is nobody's: the first node to
            // mount takes it, so "follows" would be wrong (docs/MIGRATION.md).
            let note = if left < 0 || l.is_released() {
                format!(
                    "; it {}: the first membridge node to mount takes it at epoch {}",
                    if l.is_released() {
                        "was released".to_string()
                    } else {
                        format!("expired {} s ago", -left)
                    },
                    l.epoch + 1
                )
            } else if mine {
                String::new()
            } else if crate::coexist::written_by_old_tool(l) {
                format!(
                    "; note: {} holds it with the old tool for {left} s more; this node ({}) stays read-only until then or until `membridge leadership select {} --force` (migrate on {} instead to keep writing there; `doctor` says DEGRADED meanwhile)",
                    l.primary_node_id, cfg.node_id, cfg.node_id, l.primary_node_id
                )
            } else {
                format!(
                    "; note: this node ({}) is not that primary, so after mounting it follows {} (migrate on the primary to keep writing there)",
                    cfg.node_id, l.primary_node_id
                )
            };
            say.info(format!(
                "lease: primary {} at epoch {} ({}); kept as is, the manifest starts at epoch {}{note}",
                l.primary_node_id, l.epoch, l.policy, l.epoch,
            ));
        }
        None => say.info(
            "lease: none; kept so: the first node to mount takes it at epoch 1 (manifest epoch 0)",
        ),
    }

    match mount::state(&opts.dir) {
        MountState::NotMounted => {}
        MountState::Live => {
            return Err(MigrateError::Refused(format!(
                "{} is mounted by membridge: migrate runs before the first mount (membridge unmount {} first)",
                opts.dir.display(),
                opts.dir.display()
            )))
        }
        MountState::Stale => {
            return Err(MigrateError::Refused(format!(
                "{} is a stale mount (its daemon is gone): membridge unmount {} first",
                opts.dir.display(),
                opts.dir.display()
            )))
        }
        MountState::Foreign => {
            return Err(MigrateError::Refused(format!(
                "{} has another filesystem mounted over it; unmount it first",
                opts.dir.display()
            )))
        }
    }
    if !opts.dir.is_dir() {
        return Err(MigrateError::Refused(format!(
            "{} is not a directory (create it, or pass the directory to mount)",
            opts.dir.display()
        )));
    }

    // Download and verify (also in a dry run: it proves the adoption would work).
    let work = WorkDir::new(cfg, opts.dry_run)?;
    let image = work.path.join("legacy.db");
    say.info(format!(
        "downloading {} to {}",
        layout.legacy_db(),
        image.display()
    ));
    let got = download(store, &layout.legacy_db(), size, &image, opts.progress).await?;
    if got != sha {
        return Err(MigrateError::ShaMismatch {
            key: layout.legacy_db(),
            sha_key: layout.legacy_sha256(),
            got,
            want: sha,
        });
    }
    if let Some(other) = lm_str(|m| &m.sha256).filter(|s| !s.eq_ignore_ascii_case(&sha)) {
        return Err(MigrateError::Refused(format!(
            "{} names sha256 {other}, but {} and its .sha256 say {sha}: the old tool's push was interrupted; push again, then migrate",
            layout.legacy_manifest(),
            layout.legacy_db()
        )));
    }
    let seed = Seed::inspect(&image)?;
    say.info(format!(
        "verified: sha256 matches; SQLite image of {} pages of {} bytes, integrity ok, {}",
        seed.size_pages,
        seed.page_size,
        seed.stats.describe()
    ));

    // The local database: keep, install, or refuse.
    let local = opts.dir.join(DB);
    let local_plan = plan_local(&local, &seed, &sha, opts.replace_local)?;
    let busy = open_by(&local);
    if !matches!(local_plan, LocalPlan::Keep) && !busy.is_empty() {
        return Err(MigrateError::Refused(format!(
            "{} is open by {}: stop the claude-mem worker and Claude sessions first",
            local.display(),
            busy.join(", ")
        )));
    }
    if let Some(h) = &local_head {
        if !seed.is_head(h) {
            return Err(MigrateError::Refused(format!(
                "the local journal {} already holds history of {DB} (generation {}, txid {}): this machine ran membridge on this project before; migrate only seeds a fresh state (move {} aside if that history is not needed)",
                journal_path.display(),
                h.generation,
                h.head_txid,
                cfg.state_dir.display()
            )));
        }
    }

    let snap_key = layout.snapshot(DB, SEED_TXID);
    let meta = SnapshotMeta {
        db_name: DB.to_string(),
        node_id: cfg.node_id.clone(),
        txid: SEED_TXID,
        epoch: lease_epoch.unwrap_or(0),
        page_size: seed.page_size,
        page_count: seed.size_pages,
        db_checksum: seed.checksum,
        timestamp_ms: chrono::Utc::now().timestamp_millis(),
    };
    let mut changed = false;

    // 1. Back up the local database before anything can touch it.
    match &local_plan {
        LocalPlan::Keep | LocalPlan::Install { backup: false, .. } => {}
        LocalPlan::Install { backup: true, why } => {
            let dest = cfg.state_dir.join("backups").join(format!(
                "{}-{}.db",
                DB.trim_end_matches(".db"),
                chrono::Utc::now().format("%Y%m%dT%H%M%SZ")
            ));
            say.step(format!(
                "back up the local {DB} ({why}) with VACUUM INTO {}",
                dest.display()
            ));
            if !opts.dry_run {
                backup(&local, &dest)?;
            }
            if why.as_str() == "--replace-local" {
                // Its own history is not lost: it can join the bucket's.
                say.info(format!(
                    "once mounted as the primary, `membridge merge {}` imports the rows the bucket's copy lacks",
                    dest.display()
                ));
            }
        }
    }

    // 2. The first snapshot (immutable, create-only).
    if !complete_local_only {
        let exists = match store.head(&snap_key).await {
            Ok(_) => {
                let got = store.get_range(&snap_key, 0, 4096).await?;
                let found = SnapshotReader::parse_header(&got)
                    .map_err(|e| MigrateError::Conflict(format!("{snap_key}: {e}")))?;
                if found.db_checksum != seed.checksum {
                    return Err(MigrateError::Conflict(format!(
                        "{snap_key} already holds another image (written by node {}): refusing to adopt over it",
                        found.node_id
                    )));
                }
                true
            }
            Err(StoreError::NotFound { .. }) => false,
            Err(e) => return Err(e.into()),
        };
        if exists {
            say.info(format!("snapshot {snap_key} is already there"));
        } else {
            say.step(format!(
                "upload the snapshot {snap_key} (txid {SEED_TXID}, epoch {}, checksum {})",
                meta.epoch,
                hex64(seed.checksum)
            ));
            if !opts.dry_run {
                let body = image.with_extension("snapshot");
                let len = encode(&image, meta.clone(), &body, opts.progress)?;
                let bar = spinner(opts.progress, format!("uploading {len} bytes"));
                let put = store.put_file(&snap_key, &body, PutMode::CreateOnly).await;
                bar.finish_and_clear();
                let _ = std::fs::remove_file(&body);
                match put {
                    Ok(_) | Err(StoreError::PreconditionFailed { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            changed = true;
        }
    }

    // 3. This machine's state: base image, database file, journal head.
    let base_dir = cfg.state_dir.join("base");
    let base = base_path(&base_dir, DB, SEED_TXID);
    if local_head.is_none() {
        say.step(format!(
            "seed the local state: base image {} and journal {} (generation {SEED_GENERATION}, txid {SEED_TXID})",
            base.display(),
            journal_path.display()
        ));
    }
    if let LocalPlan::Install { why, .. } = &local_plan {
        say.step(format!(
            "install the bucket's copy as {} ({why}; its -wal/-shm go with the old file)",
            local.display()
        ));
    }
    if !opts.dry_run {
        if local_head.is_none() {
            std::fs::create_dir_all(&base_dir).map_err(io(base_dir.display().to_string()))?;
            copy_atomic(&image, &base)?;
        }
        if let LocalPlan::Install { .. } = &local_plan {
            install(&image, &local)?;
        }
        if local_head.is_none() {
            let journal = Journal::open(&journal_path)
                .map_err(|e| MigrateError::Other(format!("{}: {e}", journal_path.display())))?;
            journal
                .start_generation(&seed.head())
                .map_err(|e| MigrateError::Other(format!("{}: {e}", journal_path.display())))?;
        }
    }
    changed |= local_head.is_none() || matches!(local_plan, LocalPlan::Install { .. });

    // 4. The manifest, created only if absent: a concurrent migrate or daemon
    //    is never overwritten.
    if !complete_local_only {
        let m = seed_manifest(cfg, &layout, &seed, &snap_key, &sha, lease_epoch, lm);
        say.step(format!(
            "create {} (epoch {}, {DB} generation {SEED_GENERATION} at txid {SEED_TXID}) with If-None-Match: *",
            layout.manifest(),
            m.epoch
        ));
        if !opts.dry_run {
            match manifest::swap(store, &layout, None, &m).await {
                Ok(_) => {}
                Err(StoreError::PreconditionFailed { .. }) => {
                    let now = manifest::load(store, &layout, &cfg.canonical_id)
                        .await
                        .map_err(|e| MigrateError::Conflict(e.to_string()))?;
                    let same = now.as_ref().is_some_and(|v| {
                        v.manifest.adopted.as_ref().is_some_and(|a| a.sha256 == sha)
                            && v.manifest.databases.get(DB) == m.databases.get(DB)
                    });
                    if !same {
                        return Err(MigrateError::Conflict(format!(
                            "another node created {} meanwhile with different content: not overwritten; this machine's state was seeded from the legacy snapshot, so mount and it will follow the bucket",
                            layout.manifest()
                        )));
                    }
                    say.info("another migrate created the same manifest meanwhile");
                }
                Err(e) => return Err(e.into()),
            }
        }
        changed = true;
    }
    say.info(format!(
        "legacy objects {} left in place for nodes still on the old tool",
        layout.legacy_prefix()
    ));
    if opts.dry_run {
        say.info("dry run: nothing was changed");
        return Ok(Outcome::DryRun);
    }
    if !changed {
        return Ok(nothing(&mut say, "everything is in place".into()));
    }
    say.info(format!(
        "done: next, `membridge mount {}` on this machine",
        opts.dir.display()
    ));
    Ok(Outcome::Adopted)
}

fn nothing(say: &mut Say<'_>, why: String) -> Outcome {
    say.info(format!("nothing to do: {why}"));
    Outcome::NothingToDo(why)
}

fn seed_manifest(
    cfg: &Config,
    layout: &Layout,
    seed: &Seed,
    snap_key: &str,
    sha: &str,
    lease_epoch: Option<u64>,
    lm: Option<&legacy::LegacyManifestFields>,
) -> Manifest {
    let mut m = Manifest::new(&cfg.canonical_id, &cfg.node_id, lease_epoch.unwrap_or(0));
    if let Some(e) = lease_epoch {
        // What the uploader's take-over writes for a tenure that starts on top
        // of this head, so the first mount under the same lease adds nothing.
        m.epochs.push(EpochStart {
            epoch: e,
            start_txid: BTreeMap::from([(DB.to_string(), SEED_TXID + 1)]),
        });
    }
    m.databases.insert(
        DB.to_string(),
        DbManifest {
            generation: SEED_GENERATION,
            head_txid: SEED_TXID,
            head_checksum: hex64(seed.checksum),
            page_size: seed.page_size,
            size_pages: seed.size_pages,
            snapshot: Some(SnapshotRef {
                txid: SEED_TXID,
                key: snap_key.to_string(),
                checksum: hex64(seed.checksum),
                size_pages: seed.size_pages,
                taken_at: m.updated_at.clone(),
            }),
            older_snapshots: Vec::new(),
        },
    );
    m.adopted = Some(Adoption {
        from_key: layout.legacy_db(),
        sha256: sha.to_string(),
        legacy_timestamp: lm.and_then(|m| m.timestamp.clone()),
        legacy_source_host: lm.and_then(|m| m.source_host.clone()),
        lease_epoch,
        by: cfg.node_id.clone(),
        at: m.updated_at.clone(),
    });
    m
}

mod files;

use files::*;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_ignores_vacuum_into_layout_but_not_content() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.db");
        let c = rusqlite::Connection::open(&a).unwrap();
        c.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA user_version=7;
             CREATE TABLE observations(id INTEGER PRIMARY KEY AUTOINCREMENT, text TEXT);
             CREATE TABLE t(x, y);
             INSERT INTO observations(text) VALUES ('a'), ('b'), ('c');
             INSERT INTO t VALUES (1, 2.5), (NULL, x'00ff');
             DELETE FROM observations WHERE id = 2;",
        )
        .unwrap();
        let b = dir.path().join("b.db");
        c.execute("VACUUM INTO ?1", [b.to_str().unwrap()]).unwrap();
        let copy = legacy::open_image(&b).unwrap();
        assert_ne!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        assert_eq!(content_digest(&c).unwrap(), content_digest(&copy).unwrap());
        c.execute("INSERT INTO t VALUES (3, 4)", []).unwrap();
        assert_ne!(content_digest(&c).unwrap(), content_digest(&copy).unwrap());
    }

    #[test]
    fn sidecars_are_named_like_sqlite_does() {
        assert_eq!(
            sidecar(Path::new("/x/claude-mem.db"), "-wal"),
            PathBuf::from("/x/claude-mem.db-wal")
        );
    }
}
