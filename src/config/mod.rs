//! Configuration: flags > environment > `~/.claude-mem-minio/config.env`.
//!
//! The config file belongs to the old hook-based tool; membridge only reads it so
//! that both tools can run side by side during a migration. Every lookup remembers
//! where its value came from, so an error can name the key, the places searched
//! and the fix in one line. Secrets are wrapped so they never reach a log line.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

/// Where a value was found; errors and `doctor` print it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Flag,
    Env,
    File(PathBuf),
    Default,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Flag => write!(f, "command-line flag"),
            Source::Env => write!(f, "environment"),
            Source::File(p) => write!(f, "{}", p.display()),
            Source::Default => write!(f, "built-in default"),
        }
    }
}

/// A configuration problem, rendered as the one line the user sees before exit 1.
#[derive(Debug, Clone, thiserror::Error)]
#[error("config: {key} {problem} (looked in {searched}); fix: {fix}")]
pub struct ConfigError {
    pub key: &'static str,
    pub problem: String,
    pub searched: String,
    pub fix: String,
}

pub use crate::remote::s3::{S3Settings, Secret};

/// Every key membridge understands: name, whether secret, what it means, an example.
/// The README's configuration table is generated from the same facts.
pub const KEYS: &[(&str, &str, &str)] = &[
    (
        "MINIO_ENDPOINT",
        "S3 endpoint URL (http or https; `host:port` means https unless MINIO_SECURE=0)",
        "http://127.0.0.1:9000",
    ),
    ("MINIO_ACCESS_KEY", "S3 access key", "minioadmin"),
    (
        "MINIO_SECRET_KEY",
        "S3 secret key (never printed)",
        "minioadmin",
    ),
    (
        "MINIO_BUCKET",
        "bucket holding `projects/<canonical_id>/`",
        "claude-mem",
    ),
    ("MINIO_REGION", "S3 region (default us-east-1)", "us-east-1"),
    (
        "MINIO_SECURE",
        "for an endpoint without scheme: 1 = https (default), 0 = http",
        "0",
    ),
    (
        "CLAUDE_PROJECT_ID",
        "project name; canonical_id = hex(sha256(it))[..16]",
        "my-project",
    ),
    (
        "MEMBRIDGE_NODE_ID",
        "this node's id (default: hostname)",
        "laptop",
    ),
    (
        "PRIMARY_NODE_ID",
        "pinned policy: only this node may hold the lease",
        "rpi4b",
    ),
    (
        "LEADERSHIP_ENABLED",
        "0 disables the lease (single writer guaranteed by you)",
        "1",
    ),
    (
        "LEADERSHIP_LEASE_SECONDS",
        "lease TTL in seconds (default 30)",
        "30",
    ),
    (
        "LEADERSHIP_CANDIDATE",
        "auto policy: 0 keeps this node from ever taking the lease",
        "1",
    ),
    (
        "LEADERSHIP_POLICY",
        "auto (default) or follow: the lease follows the user (a session started on a secondary asks an idle primary to hand over)",
        "follow",
    ),
    (
        "MEMBRIDGE_FOLLOW_IDLE_S",
        "policy follow: the primary counts as idle after this many seconds without a write (default 120)",
        "120",
    ),
    (
        "MEMBRIDGE_REPLICATE",
        "globs of replicated SQLite databases (default claude-mem.db)",
        "claude-mem.db,*.sqlite3",
    ),
    (
        "MEMBRIDGE_REPLICATE_FILES",
        "globs of files replicated as whole versions (default: claude-mem's migration markers; empty = none)",
        ".cwd-remap-applied-v1,.cleanup-v12.4.3-applied",
    ),
    (
        "MEMBRIDGE_POLL_MS",
        "secondary manifest poll interval in ms (default 1000)",
        "1000",
    ),
    (
        "MEMBRIDGE_CACHE_MB",
        "read-through page cache size in MiB (default 64)",
        "64",
    ),
    (
        "MEMBRIDGE_STATE_DIR",
        "state dir root (default $XDG_STATE_HOME/membridge)",
        "/var/lib/membridge",
    ),
    (
        "MEMBRIDGE_SNAPSHOT_TXNS",
        "take a snapshot after this many transactions (default 10000)",
        "10000",
    ),
    (
        "MEMBRIDGE_LEGACY_REFRESH_S",
        "while the old tool's sqlite/ copy is kept, the primary refreshes it at most this many seconds after a change (default 60)",
        "60",
    ),
    (
        "MEMBRIDGE_RETENTION_DAYS",
        "keep segments/snapshots this long (default 7)",
        "7",
    ),
    (
        "MEMBRIDGE_METRICS_ADDR",
        "serve Prometheus metrics at http://ADDR:PORT/metrics, and the status page at /, from the mount daemon (default off)",
        "127.0.0.1:9464",
    ),
    (
        "MEMBRIDGE_STATUS_TOKEN_FILE",
        "file holding the status page's token (16+ printable characters); with it, other hosts may open the page with ?token=... (default: loopback clients only, a random token)",
        "/etc/membridge/page-token",
    ),
];

/// Raw layered key/value lookup. Flags win over the environment, which wins over the file.
#[derive(Debug, Clone, Default)]
pub struct Layers {
    flags: BTreeMap<String, String>,
    env: BTreeMap<String, String>,
    file: BTreeMap<String, String>,
    file_path: Option<PathBuf>,
    file_problem: Option<String>,
}

impl Layers {
    /// Build from flags (already mapped to key names), the process environment and
    /// the config file (`MEMBRIDGE_CONFIG` flag/env, else `~/.claude-mem-minio/config.env`).
    pub fn load(flags: BTreeMap<String, String>) -> Layers {
        let env: BTreeMap<String, String> = std::env::vars()
            .filter(|(k, _)| is_known_key(k) || k == "MEMBRIDGE_CONFIG")
            .collect();
        Self::from_parts(flags, env)
    }

    pub fn from_parts(flags: BTreeMap<String, String>, env: BTreeMap<String, String>) -> Layers {
        let path = flags
            .get("MEMBRIDGE_CONFIG")
            .or_else(|| env.get("MEMBRIDGE_CONFIG"))
            .map(PathBuf::from)
            .or_else(|| home_dir().map(|h| h.join(".claude-mem-minio/config.env")));
        let mut layers = Layers {
            flags,
            env,
            ..Default::default()
        };
        if let Some(path) = path {
            match std::fs::read_to_string(&path) {
                Ok(text) => layers.file = parse_env_file(&text),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => layers.file_problem = Some(format!("{}: {e}", path.display())),
            }
            layers.file_path = Some(path);
        }
        layers
    }

    pub fn get(&self, key: &str) -> Option<(String, Source)> {
        let pick = |m: &BTreeMap<String, String>| m.get(key).filter(|v| !v.is_empty()).cloned();
        if let Some(v) = pick(&self.flags) {
            return Some((v, Source::Flag));
        }
        if let Some(v) = pick(&self.env) {
            return Some((v, Source::Env));
        }
        pick(&self.file).map(|v| (v, Source::File(self.file_path.clone().unwrap_or_default())))
    }

    /// `key` is given with an empty value in the first layer that mentions it
    /// (for keys where empty means "none" rather than "unset").
    pub fn is_set_empty(&self, key: &str) -> bool {
        [&self.flags, &self.env, &self.file]
            .into_iter()
            .find_map(|m| m.get(key))
            .is_some_and(|v| v.trim().is_empty())
    }

    pub fn config_file(&self) -> Option<&Path> {
        self.file_path.as_deref()
    }

    fn searched(&self) -> String {
        match &self.file_path {
            Some(p) => format!("flags, environment, {}", p.display()),
            None => "flags, environment (no HOME, so no config file)".into(),
        }
    }

    fn fix_hint(&self, key: &str, example: &str) -> String {
        match &self.file_path {
            Some(p) => format!("add {key}={example} to {} or export {key}", p.display()),
            None => format!("export {key}={example}"),
        }
    }

    fn missing(&self, key: &'static str) -> ConfigError {
        let problem = match &self.file_problem {
            Some(p) => format!("is not set and the config file could not be read ({p})"),
            None => "is not set".into(),
        };
        ConfigError {
            key,
            problem,
            searched: self.searched(),
            fix: self.fix_hint(key, example_for(key)),
        }
    }

    fn malformed(&self, key: &'static str, source: &Source, why: String) -> ConfigError {
        ConfigError {
            key,
            problem: format!("is malformed in {source}: {why}"),
            searched: self.searched(),
            fix: format!("set it like {key}={}", example_for(key)),
        }
    }

    pub fn required(&self, key: &'static str) -> Result<(String, Source), ConfigError> {
        self.get(key).ok_or_else(|| self.missing(key))
    }

    fn parsed<T: std::str::FromStr>(
        &self,
        key: &'static str,
        default: T,
        check: impl Fn(&T) -> bool,
    ) -> Result<T, ConfigError>
    where
        T::Err: fmt::Display,
    {
        match self.get(key) {
            None => Ok(default),
            Some((raw, src)) => match raw.trim().parse::<T>() {
                Ok(v) if check(&v) => Ok(v),
                Ok(_) => Err(self.malformed(key, &src, format!("{raw:?} is out of range"))),
                Err(e) => Err(self.malformed(key, &src, format!("{raw:?}: {e}"))),
            },
        }
    }

    fn flag(&self, key: &'static str, default: bool) -> Result<bool, ConfigError> {
        match self.get(key) {
            None => Ok(default),
            Some((raw, src)) => parse_bool(&raw)
                .ok_or_else(|| self.malformed(key, &src, format!("{raw:?} is not 0/1/true/false"))),
        }
    }
}

fn example_for(key: &str) -> &'static str {
    KEYS.iter()
        .find(|(k, _, _)| *k == key)
        .map(|(_, _, ex)| *ex)
        .unwrap_or("VALUE")
}

fn is_known_key(k: &str) -> bool {
    KEYS.iter().any(|(name, _, _)| *name == k)
}

fn parse_bool(s: &str) -> Option<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Some(true),
        "0" | "false" | "no" | "off" => Some(false),
        _ => None,
    }
}

/// `KEY=VALUE` lines as the old tool (and a shell `source`) read them: comments,
/// blank lines, an optional `export `, and single or double quotes around the value.
pub fn parse_env_file(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line).trim_start();
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let k = k.trim();
        let mut v = v.trim();
        if v.len() >= 2
            && ((v.starts_with('"') && v.ends_with('"'))
                || (v.starts_with('\'') && v.ends_with('\'')))
        {
            v = &v[1..v.len() - 1];
        } else if let Some(i) = v.find(" #") {
            v = v[..i].trim_end();
        }
        out.insert(k.to_string(), v.to_string());
    }
    out
}

pub fn home_dir() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
}

/// `hex(sha256(project_id))[..16]`, byte for byte the old tool's `canonical_id`.
pub fn canonical_id(project_id: &str) -> String {
    let digest = Sha256::digest(project_id.as_bytes());
    hex::encode(digest)[..16].to_string()
}

pub use crate::lease::Policy;

/// Path classes by glob, relative to the mount dir.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClassGlobs {
    pub databases: Vec<String>,
    pub files: Vec<String>,
}

/// Everything the daemon and the commands need, resolved and validated.
#[derive(Debug, Clone)]
pub struct Config {
    pub s3: S3Settings,
    pub project_id: String,
    pub canonical_id: String,
    pub node_id: String,
    pub policy: Policy,
    pub lease_ttl: Duration,
    pub classes: ClassGlobs,
    pub poll_interval: Duration,
    pub cache_bytes: usize,
    pub retention: Duration,
    pub snapshot_txns: u64,
    /// How stale the old tool's `sqlite/` copy may get on the primary
    /// (`crate::coexist::LegacyWatch`).
    pub legacy_refresh: Duration,
    /// Where the mount daemon serves `/metrics` (none: not served).
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// The status page's token; set, it opens the page to non-loopback clients.
    pub status_token_file: Option<PathBuf>,
    /// `<state root>/<canonical_id>`: the local journal, divergent copies, logs.
    pub state_dir: PathBuf,
    pub config_file: Option<PathBuf>,
}

impl Config {
    pub fn from_layers(l: &Layers) -> Result<Config, ConfigError> {
        let (endpoint, esrc) = l.required("MINIO_ENDPOINT")?;
        let secure = l.flag("MINIO_SECURE", true)?;
        let endpoint = normalize_endpoint(&endpoint, secure)
            .map_err(|why| l.malformed("MINIO_ENDPOINT", &esrc, why))?;
        let (bucket, bsrc) = l.required("MINIO_BUCKET")?;
        validate_bucket(&bucket).map_err(|why| l.malformed("MINIO_BUCKET", &bsrc, why))?;
        let access_key = Secret::new(l.required("MINIO_ACCESS_KEY")?.0);
        let secret_key = Secret::new(l.required("MINIO_SECRET_KEY")?.0);
        let region = l
            .get("MINIO_REGION")
            .map(|v| v.0)
            .unwrap_or_else(|| "us-east-1".into());
        let (project_id, _) = l.required("CLAUDE_PROJECT_ID")?;
        let canonical_id = canonical_id(&project_id);
        let node_id = match l.get("MEMBRIDGE_NODE_ID") {
            Some((v, src)) => {
                validate_node_id(&v).map_err(|why| l.malformed("MEMBRIDGE_NODE_ID", &src, why))?;
                v
            }
            None => hostname(),
        };
        let follow = match l.get("LEADERSHIP_POLICY") {
            None => None,
            Some((raw, src)) => match raw.trim().to_ascii_lowercase().as_str() {
                "auto" => None,
                "follow" => Some(src),
                _ => {
                    return Err(l.malformed(
                        "LEADERSHIP_POLICY",
                        &src,
                        format!("{raw:?} is not auto or follow (pinned is PRIMARY_NODE_ID=NODE, disabled is LEADERSHIP_ENABLED=0)"),
                    ))
                }
            },
        };
        let idle_s: u64 = l.parsed("MEMBRIDGE_FOLLOW_IDLE_S", 120, |v| (1..=86_400).contains(v))?;
        let candidate = l.flag("LEADERSHIP_CANDIDATE", true)?;
        let policy = if !l.flag("LEADERSHIP_ENABLED", true)? {
            Policy::Disabled
        } else if let Some((primary, src)) = l.get("PRIMARY_NODE_ID") {
            validate_node_id(&primary).map_err(|why| l.malformed("PRIMARY_NODE_ID", &src, why))?;
            Policy::Pinned { primary }
        } else if follow.is_some() {
            Policy::Follow { idle_s }
        } else {
            Policy::Auto { candidate }
        };
        if let Some(src) = follow {
            let clash = match &policy {
                Policy::Disabled => Some("LEADERSHIP_ENABLED=0 uses no lease at all"),
                Policy::Pinned { .. } => Some("PRIMARY_NODE_ID pins the lease to one node"),
                _ if !candidate => Some("LEADERSHIP_CANDIDATE=0 keeps this node from taking it"),
                _ => None,
            };
            if let Some(clash) = clash {
                return Err(l.malformed(
                    "LEADERSHIP_POLICY",
                    &src,
                    format!("follow moves the lease to where the user works, but {clash}; unset one of them"),
                ));
            }
        }
        let ttl: u64 = l.parsed("LEADERSHIP_LEASE_SECONDS", 30, |v| (3..=86_400).contains(v))?;
        let poll_ms: u64 = l.parsed("MEMBRIDGE_POLL_MS", 1000, |v| (50..=600_000).contains(v))?;
        let cache_mb: usize = l.parsed("MEMBRIDGE_CACHE_MB", 64, |v| (1..=65_536).contains(v))?;
        let snapshot_txns: u64 = l.parsed("MEMBRIDGE_SNAPSHOT_TXNS", 10_000, |v| {
            (1..=100_000_000).contains(v)
        })?;
        let retention_days: u64 = l.parsed("MEMBRIDGE_RETENTION_DAYS", 7, |v| *v <= 3650)?;
        let legacy_refresh_s: u64 = l.parsed("MEMBRIDGE_LEGACY_REFRESH_S", 60, |v| {
            (1..=86_400).contains(v)
        })?;
        let classes = ClassGlobs {
            databases: globs(l, "MEMBRIDGE_REPLICATE", &["claude-mem.db"])?,
            files: replicate_files(l)?,
        };
        let metrics_addr = match l.get("MEMBRIDGE_METRICS_ADDR") {
            None => None,
            Some((raw, src)) => Some(raw.trim().parse::<std::net::SocketAddr>().map_err(|_| {
                l.malformed(
                    "MEMBRIDGE_METRICS_ADDR",
                    &src,
                    format!("{raw:?} is not IP:PORT"),
                )
            })?),
        };
        let state_root = match l.get("MEMBRIDGE_STATE_DIR") {
            Some((v, _)) => PathBuf::from(v),
            None => default_state_root(),
        };
        Ok(Config {
            s3: S3Settings {
                endpoint,
                bucket,
                region,
                access_key,
                secret_key,
            },
            state_dir: state_root.join(&canonical_id),
            project_id,
            canonical_id,
            node_id,
            policy,
            lease_ttl: Duration::from_secs(ttl),
            classes,
            poll_interval: Duration::from_millis(poll_ms),
            cache_bytes: cache_mb << 20,
            retention: Duration::from_secs(retention_days * 86_400),
            snapshot_txns,
            legacy_refresh: Duration::from_secs(legacy_refresh_s),
            metrics_addr,
            status_token_file: l
                .get("MEMBRIDGE_STATUS_TOKEN_FILE")
                .map(|(v, _)| PathBuf::from(v)),
            config_file: l.config_file().map(Path::to_path_buf),
        })
    }

    /// The role this node expects from configuration alone, before any lease is seen.
    pub fn configured_role(&self) -> &'static str {
        match &self.policy {
            Policy::Disabled => "primary",
            Policy::Pinned { primary } if *primary == self.node_id => "primary",
            Policy::Pinned { .. } => "secondary",
            Policy::Auto { candidate: true } | Policy::Follow { .. } => "candidate",
            Policy::Auto { candidate: false } => "secondary",
        }
    }

    /// The bucket's keys of this project.
    pub fn layout(&self) -> crate::remote::Layout {
        crate::remote::Layout::new(&self.canonical_id)
    }

    /// What `status.json` opens with, for a mount at `mount_dir`.
    pub fn status_identity(
        &self,
        mount_dir: &Path,
        log_file: Option<String>,
    ) -> crate::status::Identity {
        crate::status::Identity {
            node_id: self.node_id.clone(),
            canonical_id: self.canonical_id.clone(),
            mount_dir: mount_dir.display().to_string(),
            role: self.configured_role().into(),
            policy: self.policy.name().into(),
            primary: match &self.policy {
                Policy::Pinned { primary } => Some(primary.clone()),
                Policy::Disabled => Some(self.node_id.clone()),
                Policy::Auto { .. } | Policy::Follow { .. } => None,
            },
            classes: crate::status::ClassGlobsDoc {
                replicated_databases: self.classes.databases.clone(),
                replicated_files: self.classes.files.clone(),
                local: "everything else".into(),
            },
            log_file,
        }
    }

    /// What the status page's server is made from.
    pub fn page(&self) -> crate::page::PageSettings {
        crate::page::PageSettings {
            token_file: self.status_token_file.clone(),
            policy: self.policy.clone(),
        }
    }

    /// What a [`crate::lease::LeaseClient`] is made from.
    pub fn lease(&self) -> crate::lease::LeaseSettings {
        crate::lease::LeaseSettings {
            canonical_id: self.canonical_id.clone(),
            node_id: self.node_id.clone(),
            policy: self.policy.clone(),
            ttl: self.lease_ttl,
        }
    }

    /// `projects/<canonical_id>/`: every key of this project lives under it.
    pub fn prefix(&self) -> String {
        format!("projects/{}/", self.canonical_id)
    }
}

/// claude-mem's one-time migration markers: each says its migration ran on the
/// database, and each migration copies the whole database before it runs, so
/// they must agree across machines (README, "What is replicated in
/// claude-mem's data dir, and why").
pub const DEFAULT_REPLICATE_FILES: &[&str] = &[".cwd-remap-applied-v1", ".cleanup-v12.4.3-applied"];

/// `MEMBRIDGE_REPLICATE_FILES`: the default when unset anywhere; set to an
/// empty value (in any layer), no file is replicated.
fn replicate_files(l: &Layers) -> Result<Vec<String>, ConfigError> {
    const KEY: &str = "MEMBRIDGE_REPLICATE_FILES";
    if l.is_set_empty(KEY) {
        return Ok(Vec::new());
    }
    globs(l, KEY, DEFAULT_REPLICATE_FILES)
}

fn globs(l: &Layers, key: &'static str, default: &[&str]) -> Result<Vec<String>, ConfigError> {
    let Some((raw, src)) = l.get(key) else {
        return Ok(default.iter().map(|s| s.to_string()).collect());
    };
    let mut out = Vec::new();
    for g in raw
        .split([',', ' '])
        .map(str::trim)
        .filter(|g| !g.is_empty())
    {
        if g.starts_with('/') || g.split('/').any(|c| c == "..") {
            return Err(l.malformed(
                key,
                &src,
                format!("{g:?} must be relative to the mount dir"),
            ));
        }
        if g == ".membridge" || g.starts_with(".membridge/") {
            return Err(l.malformed(key, &src, format!("{g:?} is membridge's own virtual dir")));
        }
        glob::Pattern::new(g).map_err(|e| l.malformed(key, &src, format!("{g:?}: {e}")))?;
        out.push(g.to_string());
    }
    Ok(out)
}

/// Accepts `http(s)://host[:port][/]` or `host:port`; returns a URL with scheme and no
/// trailing slash. Paths are refused: the bucket is addressed path-style below the root.
pub fn normalize_endpoint(raw: &str, secure: bool) -> Result<String, String> {
    let raw = raw.trim();
    let (scheme, rest) = match raw.split_once("://") {
        Some((s, r)) => (s.to_ascii_lowercase(), r),
        None => ((if secure { "https" } else { "http" }).to_string(), raw),
    };
    if scheme != "http" && scheme != "https" {
        return Err(format!("{raw:?}: scheme must be http or https"));
    }
    let rest = rest.trim_end_matches('/');
    if rest.contains('/') || rest.contains('?') || rest.contains('#') {
        return Err(format!(
            "{raw:?}: expected scheme://host[:port] with no path"
        ));
    }
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || rest.starts_with('[') => {
            if h.contains(':') && !h.starts_with('[') {
                (rest, None) // bare IPv6 without brackets: no port
            } else {
                (h, Some(p))
            }
        }
        _ => (rest, None),
    };
    if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c == '@') {
        return Err(format!("{raw:?}: missing or invalid host"));
    }
    if let Some(p) = port {
        if p.parse::<u16>().map(|p| p == 0).unwrap_or(true) {
            return Err(format!("{raw:?}: port {p:?} is not a number in 1..65535"));
        }
    }
    Ok(format!("{scheme}://{rest}"))
}

fn validate_bucket(b: &str) -> Result<(), String> {
    let ok = (3..=63).contains(&b.len())
        && b.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && !b.starts_with(['-', '.'])
        && !b.ends_with(['-', '.']);
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{b:?} is not a valid bucket name (3-63 chars of a-z, 0-9, '-', '.')"
        ))
    }
}

fn validate_node_id(n: &str) -> Result<(), String> {
    if !n.is_empty()
        && n.len() <= 128
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        Ok(())
    } else {
        Err(format!("{n:?} must be 1-128 chars of A-Z a-z 0-9 - _ ."))
    }
}

pub fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

fn default_state_root() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_STATE_HOME").filter(|x| !x.is_empty()) {
        return PathBuf::from(x).join("membridge");
    }
    home_dir()
        .unwrap_or_else(|| PathBuf::from("/var/lib"))
        .join(".local/state/membridge")
}

#[cfg(test)]
mod tests;
