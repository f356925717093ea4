//! Model-based test of the replication lifecycle (issue 11, "Replication you
//! can prove"): random sequences of commits, upload rounds, bucket faults,
//! kill -9 and restarts, lease expiry, hand-overs and restores, over two or
//! three nodes sharing one bucket, with the invariants checked after every
//! step against a reference model.
//!
//! What is real: SQLite (each commit is a real transaction on the primary's
//! own database file, through the recording test VFS, whose writes are
//! reported to the node exactly as the FUSE layer reports them: after they
//! reached the file, an error failing SQLite's call), [`Capture`], the
//! [`Journal`], the [`Uploader`] (take-over, rounds, snapshots, push), the
//! node's roles and fencing ([`Node`]), divergent handling, restore, the
//! lease client with its compare-and-swaps, and the bucket semantics
//! ([`MemStore`], wrapped per node in a [`FaultyStore`]).
//!
//! What is stood in for, and how (each stand-in does what the real part does
//! to the files and the bucket, without FUSE or timers):
//! - the lease keeper and `drive_roles`: [`World::tick`] takes one keeper
//!   step (renew, or acquire) and applies the role rules of
//!   `roles::drive_roles` (its decisions are the real ones: `Node::lease_gone`,
//!   `Node::fence_reported`); time passes only by [`Step::Expire`], which ages the
//!   lease in the bucket and makes its holder's deadline pass;
//! - the secondary's view: settling it (the applier's checkpoint that folds
//!   the WAL into the main file) is a checkpoint by another connection, and
//!   promotion then forgets capture's knowledge of the old `-wal`, as
//!   `Node::settle_view` does when the view was in use;
//! - the follower: [`World::follow`] lays out the bucket's head, verified by
//!   restore, when the local file is not at it, except over a history the
//!   bucket does not have yet (issue 11, item 2): whether to hold is the real
//!   follower's decision ([`follower::hold_unpublished`]), which sets aside
//!   what the bucket moved past with the same check a start runs.
//!
//! The invariants (see [`World::check`] and [`World::settle_all`]):
//! - at most one node's history extends the bucket's (with unpublished
//!   transactions it may still publish);
//! - the bucket's history is one verified chain: restore to the head
//!   succeeds and gives an image some node had at that txid, under the epoch
//!   the manifest says owns it; at the end every published txid restores,
//!   and each follows the one before by a transaction some node committed;
//! - every acknowledged commit (its capture returned Ok) is in the bucket's
//!   head, in its node's journal, or in a divergent report of its node; once
//!   the faults are healed and every node has run, only the bucket and the
//!   reports count;
//! - a node is promoted only on a file that is its journal's head;
//! - a restore at a random published txid gives an image some node had there.
//!
//! `cargo test --lib replica::model` runs 2,000 cases (`MEMBRIDGE_MODEL_CASES`
//! changes it, `MEMBRIDGE_MODEL_STEPS` the longest sequence, 12 by default);
//! a failure prints the seed (`MEMBRIDGE_MODEL_SEED` replays it), the shrunk
//! sequence and what each of its steps did. `MEMBRIDGE_MODEL_TRACE=1` prints
//! every case's steps; `MEMBRIDGE_MODEL_FOLLOWER=unguarded` makes the
//! follower stand-in follow over unpublished transactions as the follower did
//! when issue 11 was filed (item 2), which the model finds within a few
//! hundred cases.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config as PtConfig, RngAlgorithm, TestError, TestRng, TestRunner};
use rusqlite::{Connection, OpenFlags};

use crate::fs::Replication;
use crate::journal::{DbHead, Journal};
use crate::lease::Policy as LeasePolicy;
use crate::lease::{self, Acquire, LeaseClient, LeaseError};
use crate::remote::{Fault, FaultyStore, Layout, MemStore, ObjectStore, Op, Rule};
use crate::replica::capture::Capture;
use crate::replica::manifest::{self, parse_hex64};
use crate::replica::node::{Node, Role};
use crate::replica::restore::{self, RestoreOptions, Target};
use crate::replica::uploader::{
    Fenced, Outcome, Policy, UploadError, UploadSettings, UploadShared, Uploader,
};
use crate::replica::{divergent, follower};
use crate::sqlite::checksum::PageHashes;
use crate::sqlite::testvfs::{Ev, Kind, RecVfs};
use crate::status::Status;

const DB: &str = "m.db";
const CID: &str = "model";

/// A database's content as the model sees it: the ids of table `t`. Every
/// commit inserts fresh ids, so an image names a point of one history.
type Image = BTreeSet<u64>;

// ─────────────────────────────────────────────────────────────────────────────
// The recording VFS, routed per thread to the node whose SQLite is running
// ─────────────────────────────────────────────────────────────────────────────

type Route = Box<dyn Fn(&Ev) -> bool>;

thread_local! {
    static ROUTE: RefCell<Option<Route>> = const { RefCell::new(None) };
    static VFS: &'static RecVfs = {
        let v: &'static RecVfs = Box::leak(Box::new(RecVfs::register(false)));
        v.on_change(|ev| ROUTE.with(|r| r.borrow().as_ref().is_none_or(|f| f(ev))));
        v
    };
}

/// Runs `f` (SQLite calls on this thread) with every write, truncate and
/// delete reported to `route`, then drops the VFS's log.
fn with_route<T>(route: Route, f: impl FnOnce() -> T) -> T {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            ROUTE.with(|r| *r.borrow_mut() = None);
            VFS.with(|v| drop(v.take()));
        }
    }
    ROUTE.with(|r| *r.borrow_mut() = Some(route));
    let _reset = Reset;
    f()
}

/// The oldest txid a restore of `d` can reach: its oldest snapshot kept.
fn oldest_restorable(d: &manifest::DbManifest) -> u64 {
    d.older_snapshots
        .iter()
        .chain(d.snapshot.iter())
        .map(|s| s.txid)
        .min()
        .unwrap_or(d.head_txid)
}

/// What the FUSE layer does with a write it passed through: report it to
/// the node's replication (capture, on a primary); an error fails the call.
fn to_node(node: Arc<Node>) -> Route {
    Box::new(move |ev| {
        let class = |k: &Kind| super::capture::class_of(k, DB);
        let res = match ev {
            Ev::Write { kind, offset, data } => {
                class(kind).map(|c| node.written(&c, *offset, data.len() as u64))
            }
            Ev::Truncate { kind, size } => class(kind).map(|c| node.truncated(&c, *size)),
            Ev::Delete { kind } => class(kind).map(|c| node.removed(&c)),
        };
        res.is_none_or(|r| r.is_ok())
    })
}

/// The daemon died: writes still reach the file, nobody is told.
fn unreported() -> Route {
    Box::new(|_| true)
}

/// A client connection of the primary, through the recording VFS. It never
/// checkpoints at close unless told to (a client that dies, or one whose
/// node lost the lease, leaves its WAL as it is).
fn client(path: &Path) -> rusqlite::Result<Connection> {
    let name = VFS.with(|v| v.name.clone());
    let c = Connection::open_with_flags_and_vfs(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        name.as_str(),
    )?;
    c.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
        true,
    )?;
    // One thread runs every client: a lock it waits for is the daemon's
    // (the tailer's pin, say), which nothing releases meanwhile. What a
    // real client would get after its own timeout, it gets at once.
    c.busy_timeout(Duration::from_millis(5))?;
    Ok(c)
}

fn ids(c: &Connection) -> rusqlite::Result<Image> {
    let mut st = c.prepare("SELECT id FROM t")?;
    let rows = st.query_map([], |r| r.get::<_, i64>(0))?;
    rows.map(|r| r.map(|v| v as u64)).collect()
}

/// The image of a database file with no WAL (a restore, a copy), read
/// without touching it.
fn ids_of(path: &Path) -> Result<Image, String> {
    let uri = format!("file:{}?immutable=1", path.display());
    let c = Connection::open_with_flags(
        uri,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_URI,
    )
    .map_err(|e| format!("{}: {e}", path.display()))?;
    ids(&c).map_err(|e| format!("{}: {e}", path.display()))
}

fn show(img: &Image) -> String {
    let v: Vec<String> = img.iter().map(u64::to_string).collect();
    format!("{{{}}}", v.join(","))
}

mod check;
mod client;
mod keeper;
mod run;
mod steps;
mod world;

use steps::{case, Case, FaultKind, Obj, Step};

// ─────────────────────────────────────────────────────────────────────────────
// The world: nodes, bucket, reference model
// ─────────────────────────────────────────────────────────────────────────────

/// A running daemon's in-memory state (dropped by kill -9).
struct Up {
    journal: Arc<Journal>,
    node: Arc<Node>,
    uploader: Uploader,
    epoch: Arc<AtomicU64>,
    client: LeaseClient,
    held: Option<lease::Versioned>,
    /// The holder's deadline passed (time went by, see [`Step::Expire`]).
    expired: bool,
    /// The keeper's first acquire (which reclaims an earlier run's lease) ran.
    started: bool,
    /// Released on purpose: the keeper stays away for one step.
    backoff: bool,
    /// The epoch released on purpose (0: none), as `LeaseKeeper` keeps it.
    released: u64,
    conn: Option<Connection>,
}

/// One machine: files and state dir survive kill -9, `up` does not.
struct Sim {
    name: String,
    backing: PathBuf,
    state: PathBuf,
    store: Arc<FaultyStore>,
    up: Option<Up>,
    /// The model's image of the node's database (main file and WAL).
    img: Option<Image>,
    /// The image a commit cut short by a crash left in the files.
    crashed: Option<Image>,
    /// Commits the kernel served (tailing) that capture has not read yet,
    /// oldest first, and the journal head (generation, txid) they follow.
    pending: Vec<Pending>,
    pending_base: Option<(u64, u64)>,
}

/// A commit acknowledged by SQLite on a database the kernel serves: in the
/// files, not yet in the journal (docs/ARCHITECTURE.md, "Passthrough").
#[derive(Debug, Clone)]
struct Pending {
    pre: Image,
    post: Image,
    ids: Vec<u64>,
}

/// An image some node had at a txid: the candidates a restore must match.
#[derive(Debug, Clone)]
struct Cand {
    image: Image,
    /// The image at the txid before, for a transaction (None: a generation
    /// base, which starts history over).
    pre: Option<Image>,
    /// The epoch the transaction was written under (None: any).
    epoch: Option<u64>,
    what: String,
}

/// A commit whose capture returned Ok.
#[derive(Debug, Clone)]
struct Ack {
    node: usize,
    txid: u64,
    ids: Vec<u64>,
}

/// A broken invariant (or a stand-in that could not do its part).
type Check = Result<(), String>;

struct World<'r> {
    rt: &'r tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
    mem: Arc<MemStore>,
    layout: Layout,
    nodes: Vec<Sim>,
    next_id: u64,
    acks: Vec<Ack>,
    cands: BTreeMap<u64, Vec<Cand>>,
    /// The bucket's head as last verified: (manifest ETag, txid, image).
    verified: Option<(String, u64, Image)>,
    /// Journal images already materialized: (node, generation, txid, checksum).
    journal_images: HashMap<(usize, u64, u64, u64), Image>,
    trace: Vec<String>,
    /// What happened, counted (printed once per run: what the cases covered).
    stats: BTreeMap<&'static str, u64>,
    tmp: PathBuf,
    tmp_n: u64,
    /// Databases of primaries are served by the kernel once armed, their
    /// commits tailed (src/replica/tail/), instead of reported per write.
    tailing: bool,
}

fn policy() -> Policy {
    Policy {
        batch_window: Duration::ZERO,
        segment_bytes: 64 << 10,
        // Small, so that snapshots (and base advances) happen within a case.
        snapshot_txns: 3,
        ..Policy::default()
    }
}

fn up_journal(s: &Sim) -> &Journal {
    &s.up.as_ref().unwrap().journal
}

fn head_str(h: Option<&DbHead>) -> String {
    match h {
        None => "(none)".into(),
        Some(h) => format!(
            "gen {} txid {} (uploaded {}, base {})",
            h.generation, h.head_txid, h.uploaded_txid, h.base_txid
        ),
    }
}
