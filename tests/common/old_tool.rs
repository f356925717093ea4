//! The old hook-based tool's bucket behaviour, re-implemented for the
//! coexistence tests (the script carries no licence, so it is not vendored).
//!
//! Follows maxfraieho/membridge `sqlite_minio_sync.py` at commit
//! 61fd24d0f41c8969a70ed397cfa7c0863846ca19 (last change to the script:
//! 975d188): the same keys, the same plain puts (no conditions), the same
//! JSON, the same decisions and exit codes:
//!
//! - `determine_role` (run by `leadership_info`, `doctor`, and by push and pull
//!   unless `LEADERSHIP_ENABLED=0`): no lease → writes one naming
//!   `PRIMARY_NODE_ID` (or itself, with `needs_ui_selection`); an expired lease
//!   (`expires_at < now`, with *its* clock) and `PRIMARY_NODE_ID` equal to its
//!   own node id → writes one naming itself at `epoch + 1` for
//!   `LEADERSHIP_LEASE_SECONDS` (3,600 s); otherwise reads only.
//! - `push_sqlite`: exit 3 when it is secondary (unless
//!   `ALLOW_SECONDARY_PUSH=1`), 0 when the remote `.sha256` already matches,
//!   else the lock (`locks/active.lock`), then database, `.sha256`,
//!   `manifest.json`, all plain puts of a `VACUUM INTO` copy.
//! - `pull_sqlite`: exit 1 without a remote `.sha256`, 0 when it matches the
//!   local file, 2 when the role check says primary (unless
//!   `ALLOW_PRIMARY_PULL_OVERRIDE=1`), else a verified download replaces the
//!   local file (the old one goes to `backups/pull-overwrite/<ts>/`).
//!
//! The worker stop/start and the hooks are left out: no bucket effect.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use membridge::remote::{Layout, ObjectStore, PutMode, S3Store, StoreError};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::{block_on, SeaweedFs};

/// What the script's exit codes mean.
pub const RC_OK: i32 = 0;
pub const RC_ERROR: i32 = 1;
pub const RC_PRIMARY_PULL_REFUSED: i32 = 2;
pub const RC_SECONDARY_PUSH_BLOCKED: i32 = 3;

/// One old-tool node: its environment and its local database.
pub struct OldTool {
    store: S3Store,
    layout: Layout,
    project: String,
    canonical_id: String,
    /// `MEMBRIDGE_NODE_ID` (default: the host name).
    pub node_id: String,
    /// `PRIMARY_NODE_ID` (empty: unset).
    pub primary_node_id: String,
    /// `LEADERSHIP_ENABLED` (default 1).
    pub leadership_enabled: bool,
    /// `ALLOW_SECONDARY_PUSH` (default 0).
    pub allow_secondary_push: bool,
    /// `ALLOW_PRIMARY_PULL_OVERRIDE` (default 0).
    pub allow_primary_pull_override: bool,
    /// `LEADERSHIP_LEASE_SECONDS` (default 3600).
    pub lease_seconds: i64,
    /// How far this machine's clock is ahead of the test's (seconds).
    pub clock_ahead_s: i64,
    /// `CLAUDE_MEM_DB`.
    pub db: PathBuf,
    /// The lines it printed, as the script would (for failure messages).
    pub log: Vec<String>,
}

impl OldTool {
    pub fn new(s3: &SeaweedFs, bucket: &str, project: &str, node_id: &str, db: &Path) -> OldTool {
        let canonical_id = membridge::config::canonical_id(project);
        OldTool {
            store: s3.store(bucket),
            layout: Layout::new(&canonical_id),
            project: project.to_string(),
            canonical_id,
            node_id: node_id.to_string(),
            primary_node_id: String::new(),
            leadership_enabled: true,
            allow_secondary_push: false,
            allow_primary_pull_override: false,
            lease_seconds: 3600,
            clock_ahead_s: 0,
            db: db.to_path_buf(),
            log: Vec::new(),
        }
    }

    fn now(&self) -> i64 {
        chrono::Utc::now().timestamp() + self.clock_ahead_s
    }

    fn say(&mut self, line: String) {
        self.log.push(line);
    }

    fn get(&self, key: &str) -> Option<Bytes> {
        match block_on(self.store.get(key)) {
            Ok(g) => Some(g.body),
            Err(StoreError::NotFound { .. }) => None,
            Err(e) => panic!("old tool: get {key}: {e}"),
        }
    }

    fn put(&self, key: &str, body: Vec<u8>) {
        block_on(self.store.put(key, body.into(), PutMode::Overwrite))
            .unwrap_or_else(|e| panic!("old tool: put {key}: {e}"));
    }

    /// `read_lease`: any failure (absent, unparsable) reads as no lease.
    pub fn read_lease(&self) -> Option<Value> {
        self.get(&self.layout.lease())
            .and_then(|b| serde_json::from_slice(&b).ok())
    }

    /// `write_lease` with its audit entry: plain puts.
    fn write_lease(&mut self, primary: &str, epoch: i64, needs_ui: bool) -> Value {
        let now = self.now();
        let mut lease = json!({
            "canonical_id": self.canonical_id,
            "primary_node_id": primary,
            "issued_at": now,
            "expires_at": now + self.lease_seconds,
            "lease_seconds": self.lease_seconds,
            "epoch": epoch,
            "policy": "primary_authoritative",
            "issued_by": self.node_id,
        });
        if needs_ui {
            lease["needs_ui_selection"] = json!(true);
        }
        self.put(
            &self.layout.lease(),
            serde_json::to_vec_pretty(&lease).unwrap(),
        );
        let mut audit = lease.clone();
        audit["event"] = json!("lease_written");
        audit["timestamp"] = json!(chrono::Utc::now().to_rfc3339());
        let ts = chrono::Utc::now().format("%Y%m%dT%H%M%SZ");
        let key = format!(
            "{}leadership/audit/{ts}-{}.json",
            self.layout.prefix(),
            self.node_id
        );
        self.put(&key, serde_json::to_vec_pretty(&audit).unwrap());
        lease
    }

    /// `determine_role`: (role, lease, was_created).
    pub fn determine_role(&mut self) -> (&'static str, Value, bool) {
        let now = self.now();
        let Some(lease) = self.read_lease() else {
            let primary = if self.primary_node_id.is_empty() {
                self.node_id.clone()
            } else {
                self.primary_node_id.clone()
            };
            let needs_ui = self.primary_node_id.is_empty();
            let lease = self.write_lease(&primary, 1, needs_ui);
            self.say(format!(
                "[leadership] no lease found — created default (primary={primary})"
            ));
            let role = if self.node_id == primary {
                "primary"
            } else {
                "secondary"
            };
            return (role, lease, true);
        };
        let expires_at = lease["expires_at"].as_i64().unwrap_or(0);
        let primary = lease["primary_node_id"].as_str().unwrap_or("").to_string();
        if expires_at < now {
            if !self.primary_node_id.is_empty() && self.primary_node_id == self.node_id {
                let epoch = lease["epoch"].as_i64().unwrap_or(1) + 1;
                let me = self.node_id.clone();
                let lease = self.write_lease(&me, epoch, false);
                self.say(format!(
                    "[leadership] lease expired — renewed as primary (epoch={epoch})"
                ));
                return ("primary", lease, true);
            }
            if let Some(l2) = self.read_lease() {
                if l2["expires_at"].as_i64().unwrap_or(0) >= now {
                    let p2 = l2["primary_node_id"].as_str().unwrap_or("");
                    let role = if p2 == self.node_id {
                        "primary"
                    } else {
                        "secondary"
                    };
                    return (role, l2, false);
                }
            }
            return ("secondary", lease, true);
        }
        let role = if primary == self.node_id {
            "primary"
        } else {
            "secondary"
        };
        (role, lease, false)
    }

    /// `leadership_info` (exit 0; it writes a lease as `determine_role` does).
    pub fn leadership_info(&mut self) -> (&'static str, Value) {
        let (role, lease, _) = self.determine_role();
        (role, lease)
    }

    /// `doctor`'s leadership section has the same effect on the bucket.
    pub fn doctor(&mut self) -> (&'static str, Value) {
        self.leadership_info()
    }

    /// `push_sqlite`; returns the exit code.
    pub fn push_sqlite(&mut self) -> i32 {
        if !self.db.exists() {
            self.say("ERROR: local DB does not exist".into());
            return RC_ERROR;
        }
        if self.leadership_enabled {
            let (role, lease, _) = self.determine_role();
            let primary = lease["primary_node_id"].as_str().unwrap_or("?").to_string();
            self.say(format!(
                "[0/6] Leadership: role={role}  node={}  primary={primary}",
                self.node_id
            ));
            if role == "secondary" && !self.allow_secondary_push {
                self.say("  SECONDARY: push blocked by default.".into());
                return RC_SECONDARY_PUSH_BLOCKED;
            }
        }
        // VACUUM INTO a snapshot next to the database, as the script does.
        let snap = self.db.with_extension("snap.db");
        let _ = std::fs::remove_file(&snap);
        let (obs, sess, prompts, tables) = {
            let c = rusqlite::Connection::open(&self.db).unwrap();
            let ic: String = c
                .query_row("PRAGMA integrity_check", [], |r| r.get(0))
                .unwrap();
            if ic != "ok" {
                return RC_ERROR;
            }
            c.execute("VACUUM INTO ?1", [snap.to_str().unwrap()])
                .unwrap();
            let s = rusqlite::Connection::open(&snap).unwrap();
            let count = |t: &str| -> i64 {
                s.query_row(&format!("SELECT COUNT(*) FROM {t}"), [], |r| r.get(0))
                    .unwrap()
            };
            let tables: i64 = s
                .query_row(
                    "SELECT COUNT(*) FROM sqlite_master WHERE type='table'",
                    [],
                    |r| r.get(0),
                )
                .unwrap();
            (
                count("observations"),
                count("session_summaries"),
                count("user_prompts"),
                tables,
            )
        };
        let body = std::fs::read(&snap).unwrap();
        let _ = std::fs::remove_file(&snap);
        let sha = hex::encode(Sha256::digest(&body));
        let remote_sha = self.get(&self.layout.legacy_sha256()).and_then(|b| {
            String::from_utf8_lossy(&b)
                .split_whitespace()
                .next()
                .map(str::to_string)
        });
        if remote_sha.as_deref() == Some(sha.as_str()) {
            self.say("  RESULT: remote already up to date".into());
            return RC_OK;
        }
        // The lock: plain put (its TTL is 7,200 s; same-host re-acquires).
        let lock_key = format!("{}locks/active.lock", self.layout.prefix());
        if let Some(lock) = self
            .get(&lock_key)
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        {
            let holder = lock["hostname"].as_str().unwrap_or("unknown");
            let age = self.now() - lock["timestamp"].as_i64().unwrap_or(0);
            if holder != self.node_id && age < 7200 + 60 {
                self.say(format!("  LOCK ACTIVE — held by {holder} for {age}s"));
                return RC_ERROR;
            }
        }
        let lock = json!({
            "hostname": self.node_id,
            "timestamp": self.now(),
            "project": self.project,
            "canonical_id": self.canonical_id,
        });
        self.put(&lock_key, serde_json::to_vec_pretty(&lock).unwrap());
        let size = body.len();
        self.put(&self.layout.legacy_db(), body);
        self.put(
            &self.layout.legacy_sha256(),
            format!("{sha}  claude-mem.db\n").into_bytes(),
        );
        let manifest = json!({
            "project": self.project,
            "canonical_id": self.canonical_id,
            "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, false),
            "source_host": self.node_id,
            "db_size": size,
            "sha256": sha,
            "observations": obs,
            "session_summaries": sess,
            "user_prompts": prompts,
            "tables": tables,
        });
        self.put(
            &self.layout.legacy_manifest(),
            serde_json::to_vec_pretty(&manifest).unwrap(),
        );
        self.say(format!("PUSH COMPLETE sha256 {sha} observations {obs}"));
        RC_OK
    }

    /// `pull_sqlite`; returns the exit code.
    pub fn pull_sqlite(&mut self) -> i32 {
        let Some(remote_sha) = self.get(&self.layout.legacy_sha256()).and_then(|b| {
            String::from_utf8_lossy(&b)
                .split_whitespace()
                .next()
                .map(str::to_string)
        }) else {
            self.say("  ERROR: sha256 not found in bucket".into());
            return RC_ERROR;
        };
        if self.db.exists() {
            let local = hex::encode(Sha256::digest(std::fs::read(&self.db).unwrap()));
            if local == remote_sha {
                self.say("  RESULT: already up to date".into());
                return RC_OK;
            }
            if self.leadership_enabled {
                let (role, _, _) = self.determine_role();
                if role == "primary" && !self.allow_primary_pull_override {
                    self.say("  PRIMARY: refusing destructive pull overwrite of local DB.".into());
                    return RC_PRIMARY_PULL_REFUSED;
                }
            }
        }
        // [3/7] the download goes to `mkstemp(suffix=".db.tmp")` beside the
        // database; failing to create it raises (a traceback, exit 1).
        let tmp = self
            .db
            .parent()
            .unwrap()
            .join(format!("tmp{:08x}.db.tmp", rand::random::<u32>()));
        if let Err(e) = std::fs::File::create_new(&tmp) {
            self.say(format!("Traceback: mkstemp: {e}"));
            return RC_ERROR;
        }
        let Some(body) = self.get(&self.layout.legacy_db()) else {
            let _ = std::fs::remove_file(&tmp);
            return RC_ERROR;
        };
        std::fs::write(&tmp, &body).unwrap();
        if hex::encode(Sha256::digest(&body)) != remote_sha {
            let _ = std::fs::remove_file(&tmp);
            self.say("  ERROR: SHA256 mismatch!".into());
            return RC_ERROR;
        }
        // [5/7] the safety backup, then [7/7] the atomic replace.
        if self.db.exists() {
            let ts = chrono::Utc::now().format("%Y%m%d-%H%M%S%f");
            let dir = self
                .db
                .parent()
                .unwrap()
                .join("backups/pull-overwrite")
                .join(ts.to_string());
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::copy(&self.db, dir.join("claude-mem.db")).unwrap();
        }
        if let Err(e) = std::fs::rename(&tmp, &self.db) {
            self.say(format!("Traceback: os.replace: {e}"));
            return RC_ERROR;
        }
        for side in ["-wal", "-shm"] {
            let mut p = self.db.as_os_str().to_os_string();
            p.push(side);
            let _ = std::fs::remove_file(PathBuf::from(p));
        }
        self.say(format!("SYNC COMPLETE sha256 {remote_sha}"));
        RC_OK
    }

    /// Rows of `table` in its local database.
    pub fn count(&self, table: &str) -> i64 {
        let c = rusqlite::Connection::open(&self.db).unwrap();
        c.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))
            .unwrap()
    }
}
