//! The status page: one self-contained HTML page at `/` of `--metrics-addr`
//! (beside `/metrics`), refreshing itself from `/api/state`, with two actions:
//! "make this node primary" and "release".
//!
//! What the page shows is read from the daemon's live state, not from
//! `status.json`: the [`Status`] document and the [`Node`]'s role in memory,
//! the [`LeaseKeeper`]'s view of the lease, the backing files' sizes, the
//! divergent reports on disk, and, from the bucket, the nodes' heartbeats and
//! the lease's audit entries. The bucket is read by a task of its own at most
//! every [`BUCKET_EVERY`] and only while someone watches the page, so an
//! unwatched page costs nothing and a watched one a couple of listings.
//!
//! The actions run the code of the CLI's `leadership select NODE` and
//! `leadership release` ([`LeaseClient::request_handover`],
//! [`LeaseClient::release_own`]), on the daemon's runtime; the page shows their
//! progress lines.
//!
//! # Who may use it
//!
//! The page and its API answer loopback clients only, unless
//! `MEMBRIDGE_STATUS_TOKEN_FILE` is configured: then any client presenting
//! that file's token (`?token=` on the page, the `X-Membridge-Token` header on
//! the API) is served. Every POST needs the token in that header: the page
//! embeds it, and a page of another site can neither read it nor send the
//! header without a CORS preflight, which is never granted. A loopback client
//! must also name a loopback host (`Host: 127.0.0.1:…`, `localhost`), so that a
//! DNS-rebinding site cannot read the page either. `/metrics` stays open to
//! all, as before. Every refusal is a 4xx with its reason.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::{bail, Context};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;

use crate::http::{Request, Response};
use crate::lease::Policy;
use crate::lease::{LeaseClient, LeaseKeeper, LeaseState, DEFAULT_HEARTBEAT_INTERVAL};
use crate::replica::node::Node;
use crate::status::Status;

const PAGE: &str = include_str!("page.html");
/// Replaced by the (HTML-escaped) token when the page is served.
const TOKEN_SLOT: &str = "__MEMBRIDGE_TOKEN__";
pub const TOKEN_HEADER: &str = "X-Membridge-Token";
/// The bucket (heartbeats, audit entries) is read at most this often...
pub const BUCKET_EVERY: Duration = Duration::from_secs(2);
/// ...and only while the page was requested within this long.
const WATCHED_FOR: Duration = Duration::from_secs(30);
/// One bucket read may take this long before it is given up.
const BUCKET_TIMEOUT: Duration = Duration::from_secs(10);
const ROLE_CHANGES: usize = 10;
const DIVERGENT_SHOWN: usize = 20;
const CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                   connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; \
                   frame-ancestors 'none'";

/// What the page needs of the running daemon, handed over once replication
/// has started ([`Site::attach`]); until then the page shows the status
/// document alone and refuses actions with 503.
pub struct Control {
    pub node: Arc<Node>,
    pub keeper: Arc<LeaseKeeper>,
    /// A client of its own, as the CLI makes one: for the actions and for
    /// reading heartbeats and audit entries.
    pub lease: LeaseClient,
    /// The daemon's runtime: the actions and the bucket reads run on it.
    pub rt: tokio::runtime::Handle,
    /// The mounted directory (underneath the mount): databases' sizes.
    pub root: OwnedFd,
}

/// What the page's server needs from the configuration.
#[derive(Debug, Clone)]
pub struct PageSettings {
    /// A file holding the token the page's actions require (the page is
    /// then served to other machines too); None: a random token, loopback.
    pub token_file: Option<PathBuf>,
    /// The lease policy, as the page describes it.
    pub policy: Policy,
}

/// `/metrics`, the page, its state and its actions; see the module docs.
pub struct Site {
    status: Status,
    policy: String,
    token: String,
    /// `MEMBRIDGE_STATUS_TOKEN_FILE` is set: non-loopback clients with the token
    /// are served.
    open_to_others: bool,
    control: OnceLock<Control>,
    shared: Arc<Shared>,
}

/// What the page's bucket task and its actions share with the handlers.
#[derive(Default)]
struct Shared {
    view: Mutex<BucketView>,
    /// When `/api/state` was last asked for (Unix ms).
    watched: AtomicI64,
    wake: tokio::sync::Notify,
    action: Mutex<Option<ActionDoc>>,
}

#[derive(Default, Clone)]
struct BucketView {
    read_at: Option<DateTime<Utc>>,
    nodes: Vec<NodeRow>,
    nodes_error: Option<String>,
    changes: Vec<RoleChange>,
    changes_error: Option<String>,
    /// Audit entries already fetched, by key (they never change).
    audit: BTreeMap<String, RoleChange>,
}

/// `GET /api/state`.
#[derive(Debug, Serialize)]
pub struct PageState {
    pub generated_at: String,
    /// Whether replication has started (the actions work).
    pub ready: bool,
    pub node: ThisNode,
    pub nodes: Vec<NodeRow>,
    pub nodes_error: Option<String>,
    /// When the bucket was last read for `nodes` and `role_changes`.
    pub bucket_read_at: Option<String>,
    pub databases: Vec<DbRow>,
    pub divergent: Vec<Divergent>,
    /// Newest first.
    pub role_changes: Vec<RoleChange>,
    pub role_changes_error: Option<String>,
    pub action: Option<ActionDoc>,
}

#[derive(Debug, Serialize)]
pub struct ThisNode {
    pub id: String,
    pub role: String,
    pub policy: String,
    pub epoch: Option<u64>,
    pub primary: Option<String>,
    pub lease: LeaseDoc,
    /// When a commit returns: "local" (journaled on this disk, shipped to the
    /// bucket within about a second) is the only mode so far.
    pub durability: String,
    /// Captured transactions not in the bucket yet, all databases.
    pub unpublished: u64,
    pub upload_state: String,
    pub last_outage: Option<crate::status::Outage>,
    pub mount_dir: String,
    /// "starting" or "ready".
    pub mount_state: String,
    pub pid: u32,
    pub version: String,
    pub started_at: String,
    pub project: String,
    pub last_error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct LeaseDoc {
    /// held, held-by, none, lost, unusable, disabled, or starting.
    pub state: String,
    pub holder: Option<String>,
    pub epoch: Option<u64>,
    pub expires_at: Option<String>,
    pub seconds_left: Option<f64>,
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct NodeRow {
    pub id: String,
    pub role: Option<String>,
    pub epoch: Option<u64>,
    pub last_seen: Option<String>,
    pub seconds_ago: Option<f64>,
    pub applied_txid: Option<u64>,
    /// Transactions behind the newest head any node reports.
    pub behind: Option<u64>,
    pub lag_seconds: Option<f64>,
    pub version: Option<String>,
    pub mount_dir: Option<String>,
    pub stale: bool,
    /// The heartbeat could not be read or parsed.
    pub error: Option<String>,
    pub this_node: bool,
}

#[derive(Debug, Serialize)]
pub struct DbRow {
    pub name: String,
    pub head_txid: u64,
    pub uploaded_txid: u64,
    pub applied_txid: u64,
    pub backlog: u64,
    pub lag_seconds: Option<f64>,
    pub size_bytes: Option<u64>,
    pub hydration: Option<crate::status::HydrationStatus>,
    pub last_upload: Option<String>,
    pub last_error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Divergent {
    /// The JSON report, in the state directory.
    pub report: String,
    /// The copy of the database as it stood, beside it.
    pub copy: Option<String>,
    pub database: Option<String>,
    pub unpublished_count: Option<u64>,
    pub epoch: Option<u64>,
    pub created_at: Option<String>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RoleChange {
    pub at: Option<String>,
    pub event: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
    pub epoch: Option<u64>,
    pub reason: Option<String>,
    pub by: Option<String>,
    pub key: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ActionDoc {
    /// "make-primary" or "release".
    pub name: String,
    pub started_at: String,
    pub lines: Vec<String>,
    pub done: bool,
    pub ok: Option<bool>,
}

impl Site {
    /// Reads the token file, if configured (a bad one stops the mount, in one
    /// line), or makes a random token for this daemon's life.
    pub fn new(cfg: &PageSettings, status: Status) -> anyhow::Result<Site> {
        let (token, open_to_others) = match &cfg.token_file {
            Some(path) => (read_token(path)?, true),
            None => (format!("{:032x}", rand::random::<u128>()), false),
        };
        Ok(Site {
            status,
            policy: match &cfg.policy {
                Policy::Pinned { primary } => format!("pinned to {primary}"),
                Policy::Auto { candidate: true } => "auto (candidate)".into(),
                Policy::Auto { candidate: false } => "auto (never takes the lease)".into(),
                Policy::Follow { idle_s } => format!("follow (after {idle_s} s idle)"),
                Policy::Disabled => "disabled (no lease)".into(),
            },
            token,
            open_to_others,
            control: OnceLock::new(),
            shared: Arc::new(Shared::default()),
        })
    }

    /// Replication is running: enable the actions, and start the task that
    /// reads heartbeats and audit entries while the page is watched.
    pub fn attach(&self, control: Control) {
        let task = bucket_task(self.shared.clone(), control.lease.clone());
        control.rt.spawn(task);
        let _ = self.control.set(control);
    }

    /// Every request of `--metrics-addr`.
    pub fn handle(&self, req: &Request) -> Response {
        let read = matches!(req.method.as_str(), "GET" | "HEAD");
        match req.path.as_str() {
            "/metrics" if read => Response::new(
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                crate::metrics::render(self.status.metrics(), &self.status.snapshot()),
            ),
            "/metrics" => not_allowed("GET, HEAD"),
            "/" | "/api/state" | "/api/make-primary" | "/api/release" => {
                if let Err(refusal) = self.admit(req) {
                    return refusal;
                }
                match (req.path.as_str(), read) {
                    ("/", true) => self.page(),
                    ("/api/state", true) => {
                        self.watched();
                        Response::json(200, &self.state())
                    }
                    ("/" | "/api/state", false) => not_allowed("GET, HEAD"),
                    (_, _) if req.method != "POST" => not_allowed("POST"),
                    (action, _) => self.act(req, action.trim_start_matches("/api/")),
                }
            }
            _ if read => Response::text(
                404,
                "not found: membridge serves its status page at /, its state at /api/state and Prometheus metrics at /metrics",
            ),
            _ => not_allowed("GET, HEAD"),
        }
    }

    /// Who may see the page and its state; see the module docs.
    fn admit(&self, req: &Request) -> Result<(), Response> {
        let peer = req.peer.ip();
        let loopback = is_loopback(peer);
        if !loopback && !self.open_to_others {
            return Err(Response::text(
                403,
                &format!(
                    "the status page answers loopback clients only (this request came from {peer}); \
                     open it on that machine, or set MEMBRIDGE_STATUS_TOKEN_FILE to serve it to others"
                ),
            ));
        }
        let presented = req
            .header(TOKEN_HEADER)
            .map(str::to_string)
            .or_else(|| req.query_param("token"));
        match presented {
            Some(t) if same_token(&t, &self.token) => Ok(()),
            Some(_) => Err(Response::text(403, "bad token")),
            None if !loopback => Err(Response::text(
                401,
                "this page needs the token of MEMBRIDGE_STATUS_TOKEN_FILE: open /?token=<token>",
            )),
            None => match req.header("host") {
                Some(h) if is_loopback_host(h) => Ok(()),
                Some(h) => Err(Response::text(
                    403,
                    &format!(
                        "Host {h:?} is not a loopback address: open the page as http://127.0.0.1:PORT/ \
                         (other names are refused, against DNS rebinding)"
                    ),
                )),
                None => Err(Response::text(400, "missing Host header")),
            },
        }
    }

    fn page(&self) -> Response {
        let html = PAGE.replace(TOKEN_SLOT, &html_escape(&self.token));
        Response::new(200, "text/html; charset=utf-8", html)
            .with_header("Content-Security-Policy", CSP)
            .with_header("X-Frame-Options", "DENY")
            .with_header("Referrer-Policy", "no-referrer")
    }

    /// Someone is looking: keep (or start) reading the bucket.
    fn watched(&self) {
        let before = self
            .shared
            .watched
            .swap(Utc::now().timestamp_millis(), Ordering::AcqRel);
        if Utc::now().timestamp_millis() - before > WATCHED_FOR.as_millis() as i64 {
            self.shared.wake.notify_one();
        }
    }

    /// `POST /api/make-primary` or `/api/release`: checks, then starts the
    /// action and answers 202 at once; the page follows its lines in the state.
    fn act(&self, req: &Request, action: &str) -> Response {
        match req.header(TOKEN_HEADER) {
            None => {
                return Response::text(
                    401,
                    &format!(
                        "missing {TOKEN_HEADER} header: actions need the token the page embeds"
                    ),
                )
            }
            Some(t) if !same_token(t, &self.token) => return Response::text(403, "bad token"),
            Some(_) => {}
        }
        if let (Some(origin), Some(host)) = (req.header("origin"), req.header("host")) {
            if origin != format!("http://{host}") {
                return Response::text(
                    403,
                    &format!("cross-origin request refused (Origin {origin:?})"),
                );
            }
        }
        let Some(control) = self.control.get() else {
            return Response::text(503, "the daemon is still starting; try again in a moment");
        };
        let name = action.to_string();
        {
            let mut current = self.shared.action.lock().unwrap();
            if let Some(a) = current.as_ref().filter(|a| !a.done) {
                return Response::text(409, &format!("{} is still running", a.name));
            }
            *current = Some(ActionDoc {
                name: name.clone(),
                started_at: Utc::now().to_rfc3339(),
                lines: Vec::new(),
                done: false,
                ok: None,
            });
        }
        let shared = self.shared.clone();
        let lease = control.lease.clone();
        let keeper = control.keeper.clone();
        let node_id = lease.node_id.clone();
        tracing::info!(action = %name, peer = %req.peer, "status page: action requested");
        control.rt.spawn(async move {
            let say_to = shared.clone();
            let mut say = move |line: &str| {
                tracing::info!("status page: {line}");
                if let Some(a) = say_to.action.lock().unwrap().as_mut() {
                    a.lines.push(line.to_string());
                }
            };
            // Exactly what `leadership select <this node>` and
            // `leadership release` do.
            let result: Result<(), String> = if name == "make-primary" {
                keeper.expect_lease(lease.select_wait());
                match lease
                    .request_handover(&node_id, lease.select_wait(), &mut say)
                    .await
                {
                    Ok(v) => lease
                        .wait_taken_over(&node_id, v.lease.epoch, lease.select_wait(), &mut say)
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                }
            } else {
                match lease.release_own().await {
                    Ok(r) => r.outcome(&node_id).map(|line| say(&line)),
                    Err(e) => Err(e.to_string()),
                }
            };
            let mut action = shared.action.lock().unwrap();
            if let Some(a) = action.as_mut() {
                if let Err(e) = &result {
                    tracing::warn!("status page: {} failed: {e}", a.name);
                    a.lines.push(format!("failed: {e}"));
                }
                a.done = true;
                a.ok = Some(result.is_ok());
            }
        });
        let what = if action == "make-primary" {
            "asked for this node to become primary"
        } else {
            "asked to release the lease"
        };
        Response::json(
            202,
            &serde_json::json!({ "accepted": true, "action": action, "message": what }),
        )
    }

    /// The page's data: a read of the live state (see the module docs).
    pub fn state(&self) -> PageState {
        let now = Utc::now();
        let doc = self.status.snapshot();
        let control = self.control.get();
        let role = control.map_or(doc.role.clone(), |c| c.node.role().name().to_string());
        let lease = match control.map(|c| c.keeper.state()) {
            None => LeaseDoc::of("starting", None, doc.epoch, None, None),
            Some(LeaseState::Held { epoch, expires, .. }) => LeaseDoc::of(
                "held",
                Some(doc.node_id.clone()),
                Some(epoch),
                Some(expires),
                None,
            ),
            Some(LeaseState::HeldBy {
                node,
                epoch,
                expires,
            }) => LeaseDoc::of("held-by", Some(node), Some(epoch), Some(expires), None),
            Some(LeaseState::None) => LeaseDoc::of("none", None, doc.epoch, None, None),
            Some(LeaseState::Released { epoch }) => {
                LeaseDoc::of("released", None, Some(epoch), None, None)
            }
            Some(LeaseState::Lost { reason }) => {
                LeaseDoc::of("lost", None, doc.epoch, None, Some(reason))
            }
            Some(LeaseState::Unusable { reason }) => {
                LeaseDoc::of("unusable", None, doc.epoch, None, Some(reason))
            }
            Some(LeaseState::Disabled) => LeaseDoc::of(
                "disabled",
                Some(doc.node_id.clone()),
                None,
                None,
                Some("LEADERSHIP_ENABLED=0: this node writes without a lease".into()),
            ),
        };
        let holds_head = matches!(role.as_str(), "primary" | "handing-over");
        let databases = doc
            .databases
            .iter()
            .map(|(name, d)| DbRow {
                name: name.clone(),
                head_txid: d.head_txid,
                uploaded_txid: d.uploaded_txid,
                applied_txid: d.applied_txid,
                backlog: d.backlog,
                // A primary is the source: the lag a secondary measured
                // before its promotion means nothing any more.
                lag_seconds: d.lag_seconds.filter(|_| !holds_head),
                size_bytes: control.and_then(|c| file_size(&c.root, name)),
                hydration: d.hydration.clone(),
                last_upload: d.last_upload.clone(),
                last_error: d.last_error.clone(),
            })
            .collect();
        let view = self.shared.view.lock().unwrap().clone();
        let mut nodes = view.nodes;
        for n in &mut nodes {
            n.this_node = n.id == doc.node_id;
            n.seconds_ago = n.last_seen.as_deref().and_then(|t| seconds_since(t, now));
        }
        let divergent = doc
            .divergent
            .iter()
            .rev()
            .take(DIVERGENT_SHOWN)
            .map(|p| read_divergent(Path::new(p)))
            .collect();
        PageState {
            generated_at: now.to_rfc3339(),
            ready: control.is_some(),
            node: ThisNode {
                id: doc.node_id.clone(),
                role,
                policy: self.policy.clone(),
                epoch: lease.epoch.or(doc.epoch),
                primary: doc.primary.clone(),
                lease,
                durability: "local".into(),
                unpublished: doc.databases.values().map(|d| d.backlog).sum(),
                upload_state: doc.upload_state.clone(),
                last_outage: doc.last_outage.clone(),
                mount_dir: doc.mount_dir.clone(),
                mount_state: doc.state.clone(),
                pid: doc.pid,
                version: doc.version.clone(),
                started_at: doc.started_at.clone(),
                project: doc.canonical_id.clone(),
                last_error: doc.last_error.clone(),
            },
            nodes,
            nodes_error: view.nodes_error,
            bucket_read_at: view.read_at.map(|t| t.to_rfc3339()),
            databases,
            divergent,
            role_changes: view.changes,
            role_changes_error: view.changes_error,
            action: self.shared.action.lock().unwrap().clone(),
        }
    }
}

impl LeaseDoc {
    fn of(
        state: &str,
        holder: Option<String>,
        epoch: Option<u64>,
        expires: Option<DateTime<Utc>>,
        reason: Option<String>,
    ) -> LeaseDoc {
        LeaseDoc {
            state: state.into(),
            holder,
            epoch,
            expires_at: expires.map(|t| t.to_rfc3339()),
            seconds_left: expires
                .map(|t| ((t - Utc::now()).num_milliseconds().max(0) as f64) / 1000.0),
            reason,
        }
    }
}

fn not_allowed(allow: &str) -> Response {
    Response::text(405, &format!("method not allowed here; use {allow}"))
        .with_header("Allow", allow)
}

/// The token file: one line of 16 to 512 printable ASCII characters.
fn read_token(path: &Path) -> anyhow::Result<String> {
    let meta = std::fs::metadata(path)
        .with_context(|| format!("MEMBRIDGE_STATUS_TOKEN_FILE {}", path.display()))?;
    if meta.len() > 4096 {
        bail!(
            "MEMBRIDGE_STATUS_TOKEN_FILE {}: larger than 4 KiB",
            path.display()
        );
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("MEMBRIDGE_STATUS_TOKEN_FILE {}", path.display()))?;
    let token = text.trim();
    if !(16..=512).contains(&token.len()) || !token.bytes().all(|b| b.is_ascii_graphic()) {
        bail!(
            "MEMBRIDGE_STATUS_TOKEN_FILE {}: the token must be 16 to 512 printable characters without spaces",
            path.display()
        );
    }
    Ok(token.to_string())
}

/// Compares in time independent of where the first difference is.
fn same_token(given: &str, expected: &str) -> bool {
    let (a, b) = (given.as_bytes(), expected.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// `127.x.x.x[:port]`, `[::1][:port]` or `localhost[:port]`.
fn is_loopback_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(h, port)| {
            if port.bytes().all(|b| b.is_ascii_digit()) {
                h
            } else {
                host
            }
        })
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<IpAddr>().is_ok_and(is_loopback)
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

fn seconds_since(t: &str, now: DateTime<Utc>) -> Option<f64> {
    let t = DateTime::parse_from_rfc3339(t).ok()?;
    Some((now - t.with_timezone(&Utc)).num_milliseconds() as f64 / 1000.0)
}

/// Size of the backing file of `db` (a path relative to the mount).
fn file_size(root: &OwnedFd, db: &str) -> Option<u64> {
    let st = nix::sys::stat::fstatat(
        Some(root.as_raw_fd()),
        db,
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .ok()?;
    Some(st.st_size as u64)
}

/// A divergent copy's JSON report (written by the fenced primary).
fn read_divergent(report: &Path) -> Divergent {
    let parsed = std::fs::metadata(report)
        .map_err(|e| e.to_string())
        .and_then(|m| {
            if m.len() > 64 * 1024 {
                Err("report larger than 64 KiB".to_string())
            } else {
                std::fs::read(report).map_err(|e| e.to_string())
            }
        })
        .and_then(|b| serde_json::from_slice::<Value>(&b).map_err(|e| e.to_string()));
    let (v, error) = match parsed {
        Ok(v) => (v, None),
        Err(e) => (Value::Null, Some(e)),
    };
    Divergent {
        report: report.display().to_string(),
        copy: v["copy"].as_str().map(String::from),
        database: v["database"].as_str().map(String::from),
        unpublished_count: v["unpublished_count"].as_u64(),
        epoch: v["epoch"].as_u64(),
        created_at: v["created_at"].as_str().map(String::from),
        error,
    }
}

/// Where the page is, for log lines and the demo.
pub fn url(addr: std::net::SocketAddr) -> String {
    if addr.ip().is_unspecified() {
        format!("http://127.0.0.1:{}/", addr.port())
    } else {
        format!("http://{addr}/")
    }
}

mod bucket;

use bucket::*;

#[cfg(test)]
mod tests;
