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

use super::capture::Capture;
use super::manifest::{self, parse_hex64};
use super::node::{Node, Role};
use super::restore::{self, RestoreOptions, Target};
use super::uploader::{Fenced, Outcome, Policy, UploadError, Uploader};
use super::{divergent, follower};
use crate::config::Policy as LeasePolicy;
use crate::fs::Replication;
use crate::journal::{DbHead, Journal};
use crate::lease::{self, Acquire, LeaseClient, LeaseError};
use crate::remote::{Fault, FaultyStore, Layout, MemStore, ObjectStore, Op, Rule};
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
    c.busy_timeout(Duration::from_secs(5))?;
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

// ─────────────────────────────────────────────────────────────────────────────
// Steps
// ─────────────────────────────────────────────────────────────────────────────

/// An object class of the bucket, to aim a fault at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Obj {
    Manifest,
    Segment,
    Snapshot,
    Lease,
}

impl Obj {
    fn pattern(self) -> &'static str {
        match self {
            Obj::Manifest => "*manifest.json",
            Obj::Segment => "*/seg/*",
            Obj::Snapshot => "*/snap/*",
            Obj::Lease => "*leadership/lease.json",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// The next put of this class is stored, its answer lost.
    Lost(Obj),
    /// The next put of this class fails (the bucket did not answer).
    Fail(Obj),
    /// Nothing reaches the bucket from this node until healed.
    Outage,
}

/// One step of a sequence. Node numbers are taken modulo the node count (so
/// shrinking the count keeps a sequence meaningful); for the client's steps
/// and uploads, modulo the nodes that act as primary (a deposed primary may
/// not know it yet): a step with no such node does nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// A transaction inserting `rows` rows on a primary.
    Commit {
        node: u8,
        rows: u8,
    },
    /// As Commit, but the daemon dies once the writes reached the file and
    /// before capture saw them (kill -9 right after).
    CrashMidCommit {
        node: u8,
        rows: u8,
    },
    /// The primary's client checkpoints (TRUNCATE) through the daemon.
    Checkpoint {
        node: u8,
    },
    /// The primary's client closes its connection (checkpoint, `-wal` gone).
    CloseClient {
        node: u8,
    },
    /// One upload round.
    Upload {
        node: u8,
    },
    /// One lease keeper step and the role rules.
    Tick {
        node: u8,
    },
    /// One follower step (secondaries and catching-up nodes).
    Follow {
        node: u8,
    },
    /// Time passes beyond the lease: it expires in the bucket and its
    /// holder's deadline passes.
    Expire,
    /// The lease holder hands over to this node (flush, publish, pass).
    HandOver {
        to: u8,
    },
    /// The lease holder releases the lease on purpose.
    Release,
    /// kill -9: in-memory state gone, files and state dir kept.
    Kill {
        node: u8,
    },
    /// Start a killed node as the daemon does (recovery, divergent check,
    /// a first keeper step).
    Start {
        node: u8,
    },
    Fault {
        node: u8,
        fault: FaultKind,
    },
    Heal {
        node: u8,
    },
    /// Restore at a published txid (`pick` modulo the published range).
    Restore {
        pick: u16,
    },
}

#[derive(Debug, Clone)]
pub struct Case {
    pub nodes: u8,
    pub steps: Vec<Step>,
}

fn obj() -> impl Strategy<Value = Obj> {
    prop_oneof![
        Just(Obj::Manifest),
        Just(Obj::Segment),
        Just(Obj::Snapshot),
        Just(Obj::Lease)
    ]
}

fn step() -> impl Strategy<Value = Step> {
    let n = || 0u8..3;
    prop_oneof![
        20 => (n(), 1u8..4).prop_map(|(node, rows)| Step::Commit { node, rows }),
        3 => (n(), 1u8..4).prop_map(|(node, rows)| Step::CrashMidCommit { node, rows }),
        2 => n().prop_map(|node| Step::Checkpoint { node }),
        2 => n().prop_map(|node| Step::CloseClient { node }),
        16 => n().prop_map(|node| Step::Upload { node }),
        12 => n().prop_map(|node| Step::Tick { node }),
        8 => n().prop_map(|node| Step::Follow { node }),
        6 => Just(Step::Expire),
        4 => n().prop_map(|to| Step::HandOver { to }),
        2 => Just(Step::Release),
        6 => n().prop_map(|node| Step::Kill { node }),
        6 => n().prop_map(|node| Step::Start { node }),
        4 => (n(), obj()).prop_map(|(node, o)| Step::Fault { node, fault: FaultKind::Lost(o) }),
        3 => (n(), obj()).prop_map(|(node, o)| Step::Fault { node, fault: FaultKind::Fail(o) }),
        2 => n().prop_map(|node| Step::Fault { node, fault: FaultKind::Outage }),
        3 => n().prop_map(|node| Step::Heal { node }),
        3 => any::<u16>().prop_map(|pick| Step::Restore { pick }),
    ]
}

fn case(max_steps: usize) -> impl Strategy<Value = Case> {
    (2u8..=3, prop::collection::vec(step(), 1..=max_steps))
        .prop_map(|(nodes, steps)| Case { nodes, steps })
}

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

impl<'r> World<'r> {
    fn new(rt: &'r tokio::runtime::Runtime, nodes: usize) -> World<'r> {
        let shm = Path::new("/dev/shm");
        let dir = if shm.is_dir() {
            tempfile::Builder::new().prefix("model").tempdir_in(shm)
        } else {
            tempfile::Builder::new().prefix("model").tempdir()
        }
        .unwrap();
        let mem = Arc::new(MemStore::new("bucket"));
        let sims = (0..nodes)
            .map(|i| {
                let root = dir.path().join(format!("n{i}"));
                let backing = root.join("backing");
                let state = root.join("state");
                std::fs::create_dir_all(&backing).unwrap();
                std::fs::create_dir_all(&state).unwrap();
                Sim {
                    name: format!("n{i}"),
                    backing,
                    state,
                    store: Arc::new(FaultyStore::new(mem.clone())),
                    up: None,
                    img: None,
                    crashed: None,
                }
            })
            .collect();
        let tmp = dir.path().join("tmp");
        std::fs::create_dir_all(&tmp).unwrap();
        World {
            rt,
            _dir: dir,
            mem,
            layout: Layout::new(CID),
            nodes: sims,
            next_id: 1,
            acks: Vec::new(),
            cands: BTreeMap::new(),
            verified: None,
            journal_images: HashMap::new(),
            trace: Vec::new(),
            stats: BTreeMap::new(),
            tmp,
            tmp_n: 0,
        }
    }

    fn stat(&mut self, what: &'static str) {
        *self.stats.entry(what).or_default() += 1;
    }

    fn note(&mut self, s: impl Into<String>) {
        self.trace.push(s.into());
    }

    fn tmp_path(&mut self, what: &str) -> PathBuf {
        self.tmp_n += 1;
        self.tmp.join(format!("{what}-{}.db", self.tmp_n))
    }

    /// Node 0 starts with claude-mem's database already there (WAL mode, a
    /// table, no rows): its first capture makes it generation 1 at txid 0.
    fn seed(&mut self) {
        let path = self.nodes[0].backing.join(DB);
        let c = Connection::open(&path).unwrap();
        c.execute_batch(
            "PRAGMA page_size = 1024; PRAGMA journal_mode = WAL;
             CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);
             PRAGMA wal_checkpoint(TRUNCATE);",
        )
        .unwrap();
        drop(c);
        self.nodes[0].img = Some(Image::new());
    }

    fn role(&self, i: usize) -> Option<Role> {
        self.nodes[i].up.as_ref().map(|u| u.node.role())
    }

    fn db_path(&self, i: usize) -> PathBuf {
        self.nodes[i].backing.join(DB)
    }

    // ── daemon lifecycle ────────────────────────────────────────────────────

    /// Start node `i` as `daemon::start_replication` does, then take one
    /// keeper step.
    fn start(&mut self, i: usize) -> Check {
        if self.nodes[i].up.is_some() {
            return Ok(());
        }
        let sim = &self.nodes[i];
        let journal = Arc::new(Journal::open(&sim.state.join("journal.db")).unwrap());
        let before = journal.head(DB).unwrap();
        let epoch = Arc::new(AtomicU64::new(journal.last_epoch().unwrap()));
        let wake = Arc::new(tokio::sync::Notify::new());
        let status = Status::for_tests(&sim.name);
        let base_dir = sim.state.join("base");
        let root = super::capture::open_root(&sim.backing);
        let capture = Arc::new(Capture::new(
            root,
            journal.clone(),
            base_dir.clone(),
            epoch.clone(),
            wake.clone(),
            status.clone(),
        ));
        let recovered = if before.is_some() || sim.backing.join(DB).exists() {
            capture.recover(DB).map_err(|e| e.to_string())
        } else {
            Ok(())
        };
        let node = Arc::new(Node::new(
            &sim.name,
            capture,
            Role::Secondary,
            status.clone(),
        ));
        let store: Arc<dyn ObjectStore> = sim.store.clone();
        let uploader = Uploader::new(
            store.clone(),
            self.layout.clone(),
            "p".into(),
            CID.into(),
            sim.name.clone(),
            journal.clone(),
            base_dir.clone(),
            epoch.clone(),
            wake,
            status,
            policy(),
            node.clone(),
        );
        // Divergent at start (daemon::set_aside_divergent).
        let found = self.rt.block_on(divergent::diverged(
            store.as_ref(),
            &self.layout,
            CID,
            &journal,
        ));
        let mut aside = Vec::new();
        if let Ok(found) = found {
            for (h, why, bucket_epoch) in found {
                divergent::set_aside(
                    &journal,
                    &base_dir,
                    &divergent::dir(&sim.state),
                    &h,
                    &sim.name,
                    Some(bucket_epoch),
                    &why,
                );
                aside.push(format!(
                    "txids {}..={}: {why}",
                    h.uploaded_txid + 1,
                    h.head_txid
                ));
                *self.stats.entry("set aside at start").or_default() += 1;
            }
        }
        let client = LeaseClient {
            store,
            layout: self.layout.clone(),
            canonical_id: CID.into(),
            node_id: sim.name.clone(),
            policy: LeasePolicy::Auto { candidate: true },
            ttl: Duration::from_secs(3600),
            skew_margin: LeaseClient::default_skew_margin(Duration::from_secs(3600)),
            session: format!("{:016x}", rand::random::<u64>()),
        };
        // What recovery made of the files: a transaction cut short by the
        // crash, captured now, or a new generation from the file as it is.
        let after = journal.head(DB).unwrap();
        let crashed = self.nodes[i].crashed.take();
        if let Some(img) = &crashed {
            self.nodes[i].img = Some(img.clone());
        }
        let name = self.nodes[i].name.clone();
        if let (Some(a), Some(img)) = (&after, self.nodes[i].img.clone()) {
            let moved = before
                .as_ref()
                .is_none_or(|b| b.generation != a.generation || b.head_txid != a.head_txid);
            if moved {
                self.stat(if before.is_some() {
                    "recoveries that captured or restarted history"
                } else {
                    "first captures"
                });
                let restarted = before.as_ref().is_none_or(|b| b.generation != a.generation);
                let epoch_of = journal
                    .txns(DB, a.head_txid.saturating_sub(1), a.head_txid, 0)
                    .ok()
                    .and_then(|t| t.first().map(|t| t.epoch));
                self.cands.entry(a.head_txid).or_default().push(Cand {
                    image: img,
                    pre: None,
                    epoch: if restarted { None } else { epoch_of },
                    what: format!("{name} recovered at start"),
                });
            }
        }
        self.note(format!(
            "  started {name}: journal {} -> {}{}{}",
            head_str(before.as_ref()),
            head_str(after.as_ref()),
            recovered
                .err()
                .map(|e| format!("; recovery failed: {e}"))
                .unwrap_or_default(),
            if aside.is_empty() {
                String::new()
            } else {
                format!("; set aside {}", aside.join("; "))
            }
        ));
        self.nodes[i].up = Some(Up {
            journal,
            node,
            uploader,
            epoch,
            client,
            held: None,
            expired: false,
            started: false,
            backoff: false,
            released: 0,
            conn: None,
        });
        self.tick(i)
    }

    /// kill -9: the client connection dies without a checkpoint, the daemon
    /// with everything in memory; files stay.
    fn kill(&mut self, i: usize) {
        if let Some(mut up) = self.nodes[i].up.take() {
            if let Some(c) = up.conn.take() {
                with_route(unreported(), || drop(c));
            }
        }
    }

    // ── lease keeper and roles (stand-in for LeaseKeeper + drive_roles) ─────

    /// One keeper step, then the role rules of `roles::drive_roles`.
    fn tick(&mut self, i: usize) -> Check {
        let rt = self.rt;
        let Some(up) = self.nodes[i].up.as_mut() else {
            return Ok(());
        };
        enum Seen {
            Held(u64),
            NotHeld,
            Unchanged,
        }
        let seen = if let Some(held) = up.held.clone() {
            if up.expired {
                up.held = None;
                up.expired = false;
                Seen::NotHeld // Lost: could not renew before it ran out
            } else {
                match rt.block_on(up.client.renew(&held)) {
                    Ok(v) => {
                        up.held = Some(v);
                        Seen::Held(held.lease.epoch)
                    }
                    Err(LeaseError::Lost { current, .. }) => {
                        up.held = None;
                        let mine = current.as_ref().is_some_and(|c| {
                            c.primary_node_id == up.client.node_id && c.is_released()
                        });
                        if mine {
                            up.released = held.lease.epoch;
                            up.backoff = true;
                        }
                        Seen::NotHeld
                    }
                    Err(_) => Seen::Unchanged,
                }
            }
        } else if up.backoff {
            up.backoff = false;
            Seen::NotHeld
        } else {
            let acquire = if up.started {
                rt.block_on(up.client.try_acquire())
            } else {
                rt.block_on(up.client.try_acquire_at_start())
            };
            match acquire {
                Ok(Acquire::Acquired { held, .. }) => {
                    up.started = true;
                    let e = held.lease.epoch;
                    up.held = Some(held);
                    Seen::Held(e)
                }
                Ok(_) => {
                    up.started = true;
                    Seen::NotHeld
                }
                Err(_) => Seen::Unchanged,
            }
        };
        // drive_roles retries a take-over while it holds the lease.
        let seen = match (seen, &up.held) {
            (Seen::Unchanged, Some(h)) => Seen::Held(h.lease.epoch),
            (s, _) => s,
        };
        match seen {
            Seen::Held(e) => self.promote(i, e),
            Seen::NotHeld => {
                self.not_held(i);
                Ok(())
            }
            Seen::Unchanged => Ok(()),
        }
    }

    /// `drive_roles` when the lease is not (or no longer) this node's.
    fn not_held(&mut self, i: usize) {
        let Some(up) = self.nodes[i].up.as_ref() else {
            return;
        };
        let node = up.node.clone();
        let was = node.role();
        let released = up.released != 0 && up.released == up.epoch.load(Ordering::Acquire);
        node.lease_gone(released, "lease lost");
        if was == Role::Primary && !released {
            *self.stats.entry("fenced on losing the lease").or_default() += 1;
        }
        let now = node.role();
        if now != was {
            let name = self.nodes[i].name.clone();
            self.note(format!("  {name}: {} -> {}", was.name(), now.name()));
        }
    }

    /// The lease is this node's at epoch `e`: catch up, take over, promote.
    fn promote(&mut self, i: usize, e: u64) -> Check {
        let rt = self.rt;
        {
            let up = self.nodes[i].up.as_ref().unwrap();
            if up.node.role() == Role::Primary && up.epoch.load(Ordering::Acquire) == e {
                return Ok(());
            }
            up.node.set_role(Role::CatchingUp);
            up.epoch.store(e, Ordering::Release);
        }
        // Node::settle_view with the view in use: the WAL folded into the
        // main file, then capture forgets what it knew of the old `-wal`.
        self.settle_view(i);
        let up = self.nodes[i].up.as_mut().unwrap();
        up.node.capture().forget_wal(DB);
        let res = rt.block_on(up.uploader.take_over(e));
        let name = self.nodes[i].name.clone();
        match res {
            Ok(()) => {
                let up = self.nodes[i].up.as_ref().unwrap();
                up.node.set_role(Role::Primary);
                self.note(format!("  {name}: primary at epoch {e}"));
                self.stat("promotions");
                self.promoted_on_journal_head(i)
            }
            Err(err) => {
                self.note(format!("  {name}: catching up at epoch {e}: {err}"));
                self.stat("take-overs refused or failed");
                Ok(())
            }
        }
    }

    /// A node is never promoted on a file that is not its journal's head.
    fn promoted_on_journal_head(&self, i: usize) -> Check {
        let up = self.nodes[i].up.as_ref().unwrap();
        let Some(h) = up.journal.head(DB).unwrap() else {
            return Ok(());
        };
        if h.page_size == 0 {
            return Ok(());
        }
        let path = self.db_path(i);
        let mut hashes = PageHashes::from_file(&path, h.page_size).map_err(|e| {
            format!(
                "{}: promoted, but its file cannot be read: {e}",
                self.nodes[i].name
            )
        })?;
        let sum = hashes
            .apply(std::iter::empty(), h.size_pages)
            .map_err(|e| e.to_string())?;
        if sum != h.head_checksum {
            return Err(format!(
                "{} was promoted on a file that is not its journal's head (journal at txid {} \
                 checksum {:016x}, file checksum {sum:016x})",
                self.nodes[i].name, h.head_txid, h.head_checksum
            ));
        }
        Ok(())
    }

    /// What the real follower records after applying or verifying: the
    /// applied txid `take_over` reads before settling the view.
    fn publish_applied(&self, i: usize, txid: u64) {
        if let Some(up) = &self.nodes[i].up {
            up.node.views().saw_head(DB, txid);
            up.node.views().applied(DB, txid);
        }
    }

    /// The secondary's view, settled: its WAL folded into the main file by
    /// a checkpoint (the applier's), nothing reported to capture.
    fn settle_view(&self, i: usize) {
        let path = self.db_path(i);
        if !path.exists() {
            return;
        }
        if let Ok(c) = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_WRITE) {
            let _ = c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
        }
    }

    /// The holder of the lease in the bucket, if it runs and knows it.
    fn holder(&self) -> Option<usize> {
        let got = self.rt.block_on(self.mem.get(&self.layout.lease())).ok()?;
        let l = lease::Lease::parse(&self.layout.lease(), &got.body, CID).ok()?;
        (0..self.nodes.len()).find(|&i| {
            self.nodes[i].up.as_ref().is_some_and(|u| {
                u.held.as_ref().is_some_and(|h| h.etag == got.etag)
                    && l.primary_node_id == self.nodes[i].name
            })
        })
    }

    /// Time passes beyond the lease's end: it is expired in the bucket, and
    /// its holder's deadline has passed.
    fn expire(&mut self) {
        let key = self.layout.lease();
        let Ok(got) = self.rt.block_on(self.mem.get(&key)) else {
            return;
        };
        let Ok(mut l) = lease::Lease::parse(&key, &got.body, CID) else {
            return;
        };
        let holder = self.holder();
        let past = chrono::Utc::now() - chrono::Duration::hours(2);
        l.issued_at = chrono::DateTime::from_timestamp(past.timestamp(), 0).unwrap();
        l.expires_at = l.issued_at + chrono::Duration::seconds(l.lease_seconds as i64);
        let put = self.rt.block_on(self.mem.put(
            &key,
            bytes::Bytes::from(l.to_json()),
            crate::remote::PutMode::IfMatch(got.etag),
        ));
        if put.is_ok() {
            for (j, s) in self.nodes.iter_mut().enumerate() {
                if let Some(up) = s.up.as_mut() {
                    if Some(j) == holder
                        || up.held.as_ref().is_some_and(|h| h.lease.epoch == l.epoch)
                    {
                        up.expired = true;
                    }
                }
            }
        }
        self.note(format!(
            "  lease of {} at epoch {} expired",
            l.primary_node_id, l.epoch
        ));
    }

    fn release(&mut self) {
        let Some(i) = self.holder() else {
            return;
        };
        let rt = self.rt;
        let up = self.nodes[i].up.as_mut().unwrap();
        let held = up.held.take().unwrap();
        let res = rt.block_on(up.client.release(&held));
        up.backoff = true;
        if !matches!(res, Err(LeaseError::Lost { .. })) {
            up.released = held.lease.epoch; // released, or it will expire
        }
        self.note(format!(
            "  {} released: {:?}",
            self.nodes[i].name,
            res.map(|_| ())
        ));
        self.not_held(i);
    }

    /// `roles::hand_over`: no new writes, push everything, pass the lease.
    fn hand_over(&mut self, to: usize) -> Check {
        let Some(i) = self.holder() else {
            return Ok(());
        };
        if i == to || self.role(i) != Some(Role::Primary) {
            return Ok(());
        }
        let rt = self.rt;
        let target = self.nodes[to].name.clone();
        let up = self.nodes[i].up.as_mut().unwrap();
        up.node.set_role(Role::HandingOver);
        let pushed = rt.block_on(up.uploader.push());
        if let Err(e) = &pushed {
            up.uploader.forget_manifest();
            let msg = format!("  hand-over postponed: {e}");
            if e.outcome() == Outcome::Fenced {
                self.fenced_by_uploader(i, e);
            } else {
                self.nodes[i]
                    .up
                    .as_ref()
                    .unwrap()
                    .node
                    .set_role(Role::Primary);
            }
            self.note(msg);
            return Ok(());
        }
        let held = up.held.clone().unwrap();
        match rt.block_on(up.client.hand_over(&held, &target)) {
            Ok(_) => {
                up.held = None;
                self.note(format!("  handed over to {target}"));
                self.stats
                    .entry("hand-overs")
                    .and_modify(|n| *n += 1)
                    .or_insert(1);
                self.not_held(i);
            }
            Err(e @ LeaseError::Lost { .. }) => {
                up.held = None;
                up.node.set_role(Role::Primary);
                self.note(format!("  hand-over failed: {e}"));
                self.not_held(i);
            }
            Err(e) => {
                up.node.set_role(Role::Primary);
                self.note(format!("  hand-over failed: {e}"));
            }
        }
        Ok(())
    }

    /// The uploader fenced the node in the background: wait until it is done.
    /// The uploader reported this node deposed: what `roles::drive_roles`
    /// does with the report.
    fn fenced_by_uploader(&self, i: usize, e: &UploadError) {
        let up = self.nodes[i].up.as_ref().unwrap();
        let epoch = up.epoch.load(Ordering::Acquire);
        let UploadError::Fenced(why) = e else {
            return;
        };
        let report = Fenced {
            epoch,
            why: why.clone(),
        };
        up.node.fence_reported(&report, epoch);
    }

    // ── the primary's client ────────────────────────────────────────────────

    fn commit(&mut self, i: usize, rows: u8, crash: bool) -> Check {
        if self.role(i) != Some(Role::Primary) || !self.db_path(i).exists() {
            return Ok(());
        }
        let path = self.db_path(i);
        let name = self.nodes[i].name.clone();
        let new: Vec<u64> = (self.next_id..self.next_id + rows as u64).collect();
        self.next_id += rows as u64;
        let up = self.nodes[i].up.as_mut().unwrap();
        if up.conn.is_none() {
            let c = with_route(to_node(up.node.clone()), || client(&path))
                .map_err(|e| format!("{name}: opening the database: {e}"))?;
            up.conn = Some(c);
        }
        let before = up.journal.head(DB).unwrap();
        let epoch = up.epoch.load(Ordering::Acquire);
        let route = if crash {
            unreported()
        } else {
            to_node(up.node.clone())
        };
        let conn = up.conn.as_mut().unwrap();
        let (pre, res, post) = with_route(route, || {
            let pre = ids(conn);
            let res = (|| {
                let tx = conn.transaction()?;
                for id in &new {
                    tx.execute(
                        "INSERT INTO t(id, v) VALUES (?1, ?2)",
                        rusqlite::params![*id as i64, format!("row {id}")],
                    )?;
                }
                tx.commit()
            })();
            (pre, res, ids(conn))
        });
        let pre = pre.map_err(|e| format!("{name}: reading before the commit: {e}"))?;
        if crash {
            if res.is_ok() {
                self.nodes[i].crashed = post.ok();
            }
            self.note(format!(
                "  {name}: wrote {new:?} and died before capture saw it"
            ));
            self.stat("commits cut short by a crash");
            self.kill(i);
            return Ok(());
        }
        if let Err(e) = res {
            return Err(format!(
                "{name}: capture refused a commit on the primary: {e}"
            ));
        }
        let post = post.map_err(|e| format!("{name}: reading after the commit: {e}"))?;
        let after = up_journal(&self.nodes[i]).head(DB).unwrap();
        let (Some(b), Some(a)) = (before, after) else {
            return Err(format!("{name}: a commit left no journal head"));
        };
        if a.head_txid != b.head_txid + 1 || a.generation != b.generation {
            return Err(format!(
                "{name}: one commit was journaled as txid {} -> {} (generation {} -> {})",
                b.head_txid, a.head_txid, b.generation, a.generation
            ));
        }
        self.note(format!(
            "  {name}: txid {} acknowledged {new:?} (epoch {epoch})",
            a.head_txid
        ));
        self.stat("acknowledged commits");
        self.cands.entry(a.head_txid).or_default().push(Cand {
            image: post.clone(),
            pre: Some(pre),
            epoch: Some(epoch),
            what: format!("{name}'s commit"),
        });
        self.acks.push(Ack {
            node: i,
            txid: a.head_txid,
            ids: new,
        });
        self.nodes[i].img = Some(post);
        Ok(())
    }

    fn client_sql(&mut self, i: usize, close: bool) -> Check {
        if self.role(i) != Some(Role::Primary) {
            return Ok(());
        }
        let name = self.nodes[i].name.clone();
        let up = self.nodes[i].up.as_mut().unwrap();
        let Some(c) = up.conn.take() else {
            return Ok(());
        };
        let route = to_node(up.node.clone());
        let res: rusqlite::Result<Option<Connection>> = with_route(route, || {
            if close {
                c.set_db_config(
                    rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
                    false,
                )?;
                c.close().map_err(|(_, e)| e)?;
                Ok(None)
            } else {
                c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
                Ok(Some(c))
            }
        });
        match res {
            Ok(c) => {
                self.nodes[i].up.as_mut().unwrap().conn = c;
                Ok(())
            }
            Err(e) => Err(format!("{name}: client checkpoint or close failed: {e}")),
        }
    }

    /// A node that is not primary has no client writing (claude-mem's
    /// worker is refused, and in the model it goes away).
    fn drop_stale_clients(&mut self) {
        for s in &mut self.nodes {
            if let Some(up) = s.up.as_mut() {
                if up.node.role() != Role::Primary {
                    if let Some(c) = up.conn.take() {
                        with_route(Box::new(|_| false), || drop(c));
                    }
                }
            }
        }
    }

    // ── uploader and follower ───────────────────────────────────────────────

    fn upload(&mut self, i: usize) -> Check {
        let rt = self.rt;
        let Some(up) = self.nodes[i].up.as_mut() else {
            return Ok(());
        };
        if !matches!(up.node.role(), Role::Primary | Role::HandingOver) {
            return Ok(());
        }
        let before = up.journal.head(DB).ok().flatten().map(|h| h.uploaded_txid);
        let res = rt.block_on(up.uploader.round());
        let after = up.journal.head(DB).ok().flatten().map(|h| h.uploaded_txid);
        if res.is_ok() && after > before {
            self.stat("upload rounds that published");
        }
        let up = self.nodes[i].up.as_mut().unwrap();
        if let Err(e) = &res {
            up.uploader.forget_manifest();
            let msg = format!("  {}: upload failed: {e}", self.nodes[i].name);
            self.stat("upload rounds failed");
            if e.outcome() == Outcome::Fenced {
                self.stat("fenced by the uploader");
                self.fenced_by_uploader(i, e);
            }
            self.note(msg);
        }
        Ok(())
    }

    /// The follower's end state on a secondary: the local file at the
    /// bucket's head (or left alone over a history the bucket lacks).
    fn follow(&mut self, i: usize) -> Check {
        if !matches!(self.role(i), Some(Role::Secondary | Role::CatchingUp)) {
            return Ok(());
        }
        self.settle_view(i);
        let rt = self.rt;
        let name = self.nodes[i].name.clone();
        let store = self.nodes[i].store.clone();
        let Ok(Some(v)) = rt.block_on(manifest::load(store.as_ref(), &self.layout, CID)) else {
            return Ok(());
        };
        let up = self.nodes[i].up.as_ref().unwrap();
        let journal = up.journal.clone();
        // MEMBRIDGE_MODEL_FOLLOWER=unguarded: follow over anything, as the
        // follower did when issue 11 was filed (item 2), to see the model
        // catch it.
        let guarded = std::env::var("MEMBRIDGE_MODEL_FOLLOWER").as_deref() != Ok("unguarded");
        if guarded {
            // Issue 11, item 2: never follow over a history the bucket does
            // not have; the real follower's own guard decides.
            let state = self.nodes[i].state.clone();
            let held = rt.block_on(follower::hold_unpublished(
                store.as_ref(),
                &self.layout,
                CID,
                &journal,
                &state,
                &name,
            ));
            let (held, notes) = match held {
                Ok(x) => x,
                Err(e) => {
                    self.note(format!(
                        "  {name}: follower could not judge its backlog: {e}"
                    ));
                    return Ok(());
                }
            };
            for n in notes {
                self.note(format!("  {name}: {n}"));
                self.stat("set aside by the follower");
            }
            if held.contains(DB) {
                self.note(format!(
                    "  {name}: not following over unpublished transactions"
                ));
                self.stat("follows refused over unpublished transactions");
                return Ok(());
            }
        }
        let Some(d) = v.manifest.databases.get(DB).cloned() else {
            return Ok(());
        };
        let path = self.db_path(i);
        if follower::at_head(&path, &d).is_some() {
            // The real follower's check at first sight: the head is applied.
            self.publish_applied(i, d.head_txid);
            return Ok(());
        }
        let tmp = self.tmp_path("follow");
        let res = rt.block_on(restore::restore_with(
            store.as_ref(),
            &self.layout,
            CID,
            DB,
            Target::Latest,
            &tmp,
            RestoreOptions {
                progress: false,
                force: true,
            },
        ));
        let report = match res {
            Ok(r) => r,
            Err(e) => {
                self.note(format!("  {name}: follower could not rebuild: {e}"));
                return Ok(());
            }
        };
        let img = ids_of(&tmp)?;
        for x in ["-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{x}", path.display()));
        }
        std::fs::copy(&tmp, &path).map_err(|e| e.to_string())?;
        let _ = std::fs::remove_file(&tmp);
        self.note(format!(
            "  {name}: laid out the bucket's txid {} {}",
            report.txid,
            show(&img)
        ));
        self.stat("follows that laid out the head");
        self.publish_applied(i, report.txid);
        self.nodes[i].img = Some(img);
        Ok(())
    }

    // ── faults ──────────────────────────────────────────────────────────────

    fn fault(&mut self, i: usize, f: FaultKind) {
        let s = &self.nodes[i].store;
        match f {
            FaultKind::Lost(o) => {
                s.inject(Rule::new(Op::Put, o.pattern(), Fault::LostResponse).times(1));
            }
            FaultKind::Fail(o) => {
                s.inject(Rule::new(Op::Put, o.pattern(), Fault::unreachable()).times(1));
            }
            FaultKind::Outage => {
                s.inject(Rule::any("*", Fault::unreachable()));
            }
        }
    }

    // ── steps ───────────────────────────────────────────────────────────────

    fn step(&mut self, s: Step) -> Check {
        let n = self.nodes.len();
        let m = |x: u8| x as usize % n;
        // Steps of the primary's client and uploader pick among the nodes
        // that act as primary (a deposed one may not know it yet).
        let primaries: Vec<usize> = (0..n)
            .filter(|&i| self.role(i) == Some(Role::Primary))
            .collect();
        let p = |x: u8| (!primaries.is_empty()).then(|| primaries[x as usize % primaries.len()]);
        let roles: Vec<String> = (0..n)
            .map(|i| self.role(i).map_or("down", |r| r.name()).to_string())
            .collect();
        self.note(format!("{s:?}   [{}]", roles.join(", ")));
        match s {
            Step::Commit { node, rows } => p(node).map_or(Ok(()), |i| self.commit(i, rows, false)),
            Step::CrashMidCommit { node, rows } => {
                p(node).map_or(Ok(()), |i| self.commit(i, rows, true))
            }
            Step::Checkpoint { node } => p(node).map_or(Ok(()), |i| self.client_sql(i, false)),
            Step::CloseClient { node } => p(node).map_or(Ok(()), |i| self.client_sql(i, true)),
            Step::Upload { node } => p(node).map_or(Ok(()), |i| self.upload(i)),
            Step::Tick { node } => self.tick(m(node)),
            Step::Follow { node } => self.follow(m(node)),
            Step::Expire => {
                self.expire();
                Ok(())
            }
            Step::HandOver { to } => self.hand_over(m(to)),
            Step::Release => {
                self.release();
                Ok(())
            }
            Step::Kill { node } => {
                self.kill(m(node));
                Ok(())
            }
            Step::Start { node } => self.start(m(node)),
            Step::Fault { node, fault } => {
                self.fault(m(node), fault);
                Ok(())
            }
            Step::Heal { node } => {
                self.nodes[m(node)].store.clear();
                Ok(())
            }
            Step::Restore { pick } => self.restore_pick(pick),
        }
    }

    // ── invariants ──────────────────────────────────────────────────────────

    fn manifest(&self) -> Option<(manifest::Versioned, manifest::DbManifest)> {
        let v = self
            .rt
            .block_on(manifest::load(self.mem.as_ref(), &self.layout, CID))
            .unwrap()?;
        let d = v.manifest.databases.get(DB)?.clone();
        Some((v, d))
    }

    /// Restore `target` from the bucket itself; the txid and image.
    fn restore(&mut self, target: Target) -> Result<(u64, Image), String> {
        let out = self.tmp_path("restore");
        let r = self
            .rt
            .block_on(restore::restore_with(
                self.mem.as_ref(),
                &self.layout,
                CID,
                DB,
                target,
                &out,
                RestoreOptions {
                    progress: false,
                    force: true,
                },
            ))
            .map_err(|e| format!("restore at {target} failed: {e}"))?;
        let img = ids_of(&out)?;
        let _ = std::fs::remove_file(&out);
        Ok((r.txid, img))
    }

    /// The image restored at `txid` is one some node had there, under the
    /// epoch the manifest says owns that txid.
    fn matches_cand(&self, m: &manifest::Manifest, txid: u64, img: &Image) -> Check {
        let owner = m.epoch_of(DB, txid);
        let cands = self.cands.get(&txid).map(Vec::as_slice).unwrap_or(&[]);
        let ok = cands
            .iter()
            .any(|c| c.image == *img && (c.epoch.is_none() || owner.is_none() || c.epoch == owner));
        if ok || (txid == 0 && img.is_empty()) {
            return Ok(());
        }
        let known: Vec<String> = cands
            .iter()
            .map(|c| format!("{} {} (epoch {:?})", c.what, show(&c.image), c.epoch))
            .collect();
        Err(format!(
            "the bucket's txid {txid} restores to {}, which no node had there under epoch {owner:?}; \
             known: [{}]",
            show(img),
            known.join("; ")
        ))
    }

    fn restore_pick(&mut self, pick: u16) -> Check {
        let Some((v, d)) = self.manifest() else {
            return Ok(());
        };
        let lo = oldest_restorable(&d);
        let t = lo + pick as u64 % (d.head_txid - lo + 1);
        let (got, img) = self.restore(Target::Txid(t))?;
        if got != t {
            return Err(format!("restore at txid {t} gave txid {got}"));
        }
        self.note(format!("  restored txid {t}: {}", show(&img)));
        self.stat("restores at a random txid");
        self.matches_cand(&v.manifest, t, &img)
    }

    /// The node's journal, whether it runs or not.
    fn with_journal<T>(&self, i: usize, f: impl FnOnce(&Journal) -> T) -> T {
        match &self.nodes[i].up {
            Some(up) => f(&up.journal),
            None => f(&Journal::open(&self.nodes[i].state.join("journal.db")).unwrap()),
        }
    }

    /// The image at the head of node `i`'s journal.
    fn journal_image(&mut self, i: usize) -> Result<Option<Image>, String> {
        let head = self.with_journal(i, |j| j.head(DB).map_err(|e| e.to_string()))?;
        let Some(h) = head.filter(|h| h.page_size != 0) else {
            return Ok(None);
        };
        let key = (i, h.generation, h.head_txid, h.head_checksum);
        if let Some(img) = self.journal_images.get(&key) {
            return Ok(Some(img.clone()));
        }
        let base = self.nodes[i].state.join("base");
        let out = self.tmp_path("journal");
        self.with_journal(i, |j| {
            crate::journal::base::materialize(j, &base, &h, h.head_txid, &out)
        })
        .map_err(|e| {
            format!(
                "{}: materializing its journal's head: {e}",
                self.nodes[i].name
            )
        })?;
        let img = ids_of(&out)?;
        let _ = std::fs::remove_file(&out);
        self.journal_images.insert(key, img.clone());
        Ok(Some(img))
    }

    /// The images of node `i`'s divergent copies.
    fn report_images(&self, i: usize) -> Vec<Image> {
        divergent::reports(&self.nodes[i].state)
            .iter()
            .filter_map(|p| {
                let r: divergent::Report = serde_json::from_slice(&std::fs::read(p).ok()?).ok()?;
                ids_of(Path::new(r.copy.as_ref()?)).ok()
            })
            .collect()
    }

    /// The checksum of `h`'s history at `txid`, if the journal still knows it.
    fn checksum_at(j: &Journal, h: &DbHead, txid: u64) -> Option<u64> {
        if txid == h.head_txid {
            return Some(h.head_checksum);
        }
        if txid < h.base_txid || txid > h.head_txid {
            return None;
        }
        j.txns(DB, txid, txid + 1, 0)
            .ok()?
            .first()
            .map(|t| t.pre_checksum)
    }

    /// The invariants that hold after every step.
    fn check(&mut self) -> Check {
        let bucket = self.manifest();
        let mut head_img = None;
        if let Some((v, d)) = &bucket {
            let fresh = self
                .verified
                .as_ref()
                .is_some_and(|(etag, _, _)| *etag == v.etag);
            if !fresh {
                let (txid, img) = self.restore(Target::Latest)?;
                if txid != d.head_txid {
                    return Err(format!(
                        "restore to the head gave txid {txid}, the manifest says {}",
                        d.head_txid
                    ));
                }
                self.matches_cand(&v.manifest, txid, &img)?;
                self.verified = Some((v.etag.clone(), txid, img));
            }
            head_img = self.verified.as_ref().map(|(_, _, img)| img.clone());
            // At most one node's history extends the bucket's.
            let mut extending = Vec::new();
            for i in 0..self.nodes.len() {
                let node_epoch = match &self.nodes[i].up {
                    Some(up) => up.epoch.load(Ordering::Acquire),
                    None => self.with_journal(i, |j| j.last_epoch().unwrap()),
                };
                let ext = self.with_journal(i, |j| {
                    let Some(h) = j.head(DB).unwrap() else {
                        return false;
                    };
                    let aside = j.divergent_through(DB).unwrap().unwrap_or(0);
                    h.generation == d.generation
                        && h.head_txid > h.uploaded_txid.max(aside)
                        && h.head_txid > d.head_txid
                        && Self::checksum_at(j, &h, d.head_txid) == parse_hex64(&d.head_checksum)
                });
                if ext && node_epoch >= v.manifest.epoch {
                    extending.push(self.nodes[i].name.clone());
                }
            }
            if extending.len() > 1 {
                return Err(format!(
                    "{} all extend the bucket's history (head txid {}, epoch {}) with transactions they may still publish",
                    extending.join(" and "),
                    d.head_txid,
                    v.manifest.epoch
                ));
            }
        }
        // Every acknowledged commit is somewhere it will be found.
        let acks = self.acks.clone();
        let mut journal_imgs: HashMap<usize, Option<Image>> = HashMap::new();
        let mut report_imgs: HashMap<usize, Vec<Image>> = HashMap::new();
        for a in &acks {
            let has = |img: &Image| a.ids.iter().all(|id| img.contains(id));
            if head_img.as_ref().is_some_and(has) {
                continue;
            }
            if let std::collections::hash_map::Entry::Vacant(e) = journal_imgs.entry(a.node) {
                e.insert(self.journal_image(a.node)?);
            }
            if journal_imgs[&a.node].as_ref().is_some_and(has) {
                continue;
            }
            let reports = report_imgs
                .entry(a.node)
                .or_insert_with(|| self.report_images(a.node));
            if reports.iter().any(has) {
                continue;
            }
            return Err(format!(
                "{}'s acknowledged commit txid {} {:?} is lost: not in the bucket's head {}, \
                 not in its journal {}, not in its {} divergent report(s)",
                self.nodes[a.node].name,
                a.txid,
                a.ids,
                head_img.as_ref().map_or("(none)".into(), show),
                journal_imgs[&a.node].as_ref().map_or("(none)".into(), show),
                reports.len()
            ));
        }
        Ok(())
    }

    /// Heal every fault, start every node, let them run until one primary
    /// has published everything and every other node has published or set
    /// aside its own; then the strong checks.
    fn settle_all(&mut self) -> Check {
        self.note("-- settle: faults healed, every node started --");
        for s in &self.nodes {
            s.store.clear();
        }
        for i in 0..self.nodes.len() {
            self.start(i)?;
        }
        let mut converged = false;
        for _ in 0..6 {
            for i in 0..self.nodes.len() {
                self.tick(i)?;
                self.upload(i)?;
                self.drop_stale_clients();
                self.follow(i)?;
            }
            if self.converged() {
                converged = true;
                break;
            }
        }
        self.check()?;
        if !converged {
            let states: Vec<String> = (0..self.nodes.len())
                .map(|i| {
                    let h = self.with_journal(i, |j| j.head(DB).unwrap());
                    let backlog = self.with_journal(i, |j| j.backlog(DB).map(|b| b.0).unwrap_or(0));
                    format!(
                        "{} {} journal {} backlog {backlog}",
                        self.nodes[i].name,
                        self.role(i).map_or("down", |r| r.name()),
                        head_str(h.as_ref())
                    )
                })
                .collect();
            return Err(format!(
                "no convergence after healing: {}",
                states.join("; ")
            ));
        }
        // Only the bucket and the divergent reports count now.
        let head_img = self.verified.as_ref().map(|(_, _, img)| img.clone());
        for a in self.acks.clone() {
            let has = |img: &Image| a.ids.iter().all(|id| img.contains(id));
            if head_img.as_ref().is_some_and(has) {
                continue;
            }
            if self.report_images(a.node).iter().any(has) {
                self.stat("acknowledged commits found in a divergent report");
                continue;
            }
            return Err(format!(
                "{}'s acknowledged commit txid {} {:?} is neither in the bucket's history {} nor in \
                 its divergent reports",
                self.nodes[a.node].name,
                a.txid,
                a.ids,
                head_img.as_ref().map_or("(none)".into(), show),
            ));
        }
        // A report whose copy holds nothing the bucket lacks tells the user
        // about transactions that are not missing (counted, not failed).
        for i in 0..self.nodes.len() {
            for img in self.report_images(i) {
                if head_img.as_ref().is_some_and(|h| img.is_subset(h)) {
                    self.stat("divergent reports with nothing the bucket lacks");
                } else {
                    self.stat("divergent reports with commits the bucket lacks");
                }
            }
        }
        // Every published txid restores, and each follows the one before.
        let Some((v, d)) = self.manifest() else {
            return Ok(());
        };
        let lo = oldest_restorable(&d);
        let mut prev: Option<Image> = None;
        for t in lo..=d.head_txid {
            let (got, img) = self.restore(Target::Txid(t))?;
            if got != t {
                return Err(format!("restore at txid {t} gave txid {got}"));
            }
            self.matches_cand(&v.manifest, t, &img)?;
            if let Some(p) = &prev {
                let follows = self
                    .cands
                    .get(&t)
                    .into_iter()
                    .flatten()
                    .any(|c| c.image == img && (c.pre.is_none() || c.pre.as_ref() == Some(p)));
                if !follows {
                    return Err(format!(
                        "the bucket's txid {t} {} does not follow its txid {} {} by any node's transaction",
                        show(&img),
                        t - 1,
                        show(p)
                    ));
                }
            }
            prev = Some(img);
            self.stat("published txids restored at the end");
        }
        Ok(())
    }

    fn converged(&self) -> bool {
        let primaries = (0..self.nodes.len())
            .filter(|&i| self.role(i) == Some(Role::Primary))
            .count();
        primaries == 1
            && self.nodes.iter().all(|s| {
                s.up.as_ref()
                    .is_some_and(|u| u.journal.backlog(DB).map(|b| b.0).unwrap_or(0) == 0)
            })
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

/// Runs one case from scratch; the error carries what each step did.
fn run_case(
    rt: &tokio::runtime::Runtime,
    c: &Case,
    stats: &RefCell<BTreeMap<&'static str, u64>>,
) -> Result<(), String> {
    let mut w = World::new(rt, c.nodes as usize);
    let res = (|| {
        w.seed();
        w.note("-- start: n0 has the database --");
        for i in 0..w.nodes.len() {
            w.start(i)?;
        }
        w.check()?;
        for s in &c.steps {
            w.step(*s)?;
            w.drop_stale_clients();
            w.check()?;
        }
        w.settle_all()
    })();
    for i in 0..w.nodes.len() {
        w.kill(i);
    }
    for (k, v) in &w.stats {
        *stats.borrow_mut().entry(k).or_default() += v;
    }
    if std::env::var_os("MEMBRIDGE_MODEL_TRACE").is_some() {
        eprintln!("{}\n", w.trace.join("\n"));
    }
    res.map_err(|e| format!("{e}\n--- what each step did ---\n{}", w.trace.join("\n")))
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

/// Runs `cases` random cases (seeded by `MEMBRIDGE_MODEL_SEED` if set);
/// panics with the seed, the shrunk sequence and its trace on a failure.
fn run_model(cases: u32, max_steps: usize) {
    let seed = std::env::var("MEMBRIDGE_MODEL_SEED")
        .ok()
        .and_then(|s| hex::decode(s.trim()).ok())
        .filter(|b| b.len() == 32)
        .unwrap_or_else(|| rand::random::<[u8; 32]>().to_vec());
    let config = PtConfig {
        cases,
        failure_persistence: None,
        max_shrink_iters: 4096,
        ..PtConfig::default()
    };
    let mut runner =
        TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &seed));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let started = std::time::Instant::now();
    let stats = RefCell::new(BTreeMap::new());
    let res = runner.run(&case(max_steps), |c| {
        run_case(&rt, &c, &stats).map_err(TestCaseError::fail)
    });
    eprintln!(
        "model: {cases} cases in {:.1} s (seed {})",
        started.elapsed().as_secs_f64(),
        hex::encode(&seed)
    );
    for (k, v) in stats.borrow().iter() {
        eprintln!("model: {v:>8} {k}");
    }
    match res {
        Ok(()) => {}
        Err(TestError::Fail(why, c)) => panic!(
            "model-based test failed; replay with MEMBRIDGE_MODEL_SEED={}\n\
             shrunk sequence ({} nodes):\n{:#?}\n{why}",
            hex::encode(&seed),
            c.nodes,
            c.steps
        ),
        Err(e) => panic!("seed {}: {e}", hex::encode(&seed)),
    }
}

#[test]
fn lifecycle_model() {
    let cases = env_u64("MEMBRIDGE_MODEL_CASES").unwrap_or(2000) as u32;
    let steps = env_u64("MEMBRIDGE_MODEL_STEPS").unwrap_or(12) as usize;
    run_model(cases, steps);
}

/// Runs one fixed sequence (a regression found by the model).
fn replay(nodes: u8, steps: &[Step]) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let c = Case {
        nodes,
        steps: steps.to_vec(),
    };
    if let Err(e) = run_case(&rt, &c, &RefCell::default()) {
        panic!("{:#?}\n{e}", c.steps);
    }
}

/// The primary commits before its first upload and dies; another node
/// takes the lease (the bucket has no history of the database yet). At its
/// restart the dead node's transactions were neither publishable (another
/// node is primary) nor set aside: a backlog nobody uploads, nobody is told
/// about. `divergent::judge` now sets them aside.
#[test]
fn model_unknown_database_after_a_takeover() {
    replay(
        2,
        &[
            Step::Commit { node: 0, rows: 1 },
            Step::Expire,
            Step::Tick { node: 1 },
            Step::Kill { node: 0 },
        ],
    );
    replay(
        2,
        &[
            Step::Expire,
            Step::Tick { node: 1 },
            Step::CrashMidCommit { node: 0, rows: 1 },
        ],
    );
}

/// The manifest's compare-and-swap is applied but its answer lost, then the
/// node restarts: it is promoted again (the bucket's head is its own), but
/// its journal never learnt that the transaction was published, so the
/// backlog never drained (and a later fencing would have reported it as
/// divergent). The uploader now marks the bucket's head as uploaded when it
/// is the node's own.
#[test]
fn model_lost_manifest_answer_then_restart() {
    replay(
        2,
        &[
            Step::Upload { node: 0 },
            Step::Fault {
                node: 0,
                fault: FaultKind::Lost(Obj::Manifest),
            },
            Step::Commit { node: 0, rows: 1 },
            Step::Upload { node: 0 },
            Step::Kill { node: 0 },
        ],
    );
}

/// Issue 11, item 4, as the model finds it: n0 is deposed with unpublished
/// transactions (set aside), follows n1's head, restarts: its file and
/// journal disagree, so it starts generation 2 at txid 4, a number past the
/// bucket's head. n1 publishes txid 3; then n0 gets the lease back and was
/// promoted without catching up ("newer": 4 > 3), its snapshot replacing
/// the bucket's history, and n1's acknowledged txid 3 was gone from it (and
/// from any report). A new local generation now continues the bucket only
/// on top of exactly the head it replaced.
#[test]
fn model_stale_new_generation_does_not_replace_a_newer_history() {
    use Step::*;
    replay(
        2,
        &[
            Commit { node: 0, rows: 1 },
            Upload { node: 0 },
            Commit { node: 0, rows: 1 },
            Commit { node: 0, rows: 1 },
            Expire,
            Tick { node: 1 },
            Follow { node: 1 },
            Tick { node: 1 },
            Tick { node: 0 },
            Commit { node: 1, rows: 1 },
            Upload { node: 1 },
            Follow { node: 0 },
            Kill { node: 0 },
            Start { node: 0 },
            Commit { node: 1, rows: 1 },
            Upload { node: 1 },
            Expire,
            Tick { node: 0 },
            Upload { node: 0 },
        ],
    );
}

/// Issue 11, item 2 (its second half), as the model finds it: the
/// manifest's compare-and-swap is applied but its answer lost, the node
/// commits again and restarts. The bucket's head is its own txid, but its
/// journal says nothing was uploaded, so take_over found neither "same
/// head" nor "uploaded == head" and the node stayed catching-up for ever.
#[test]
fn model_lost_manifest_answer_then_more_commits_and_a_restart() {
    let lost = Step::Fault {
        node: 0,
        fault: FaultKind::Lost(Obj::Manifest),
    };
    replay(
        2,
        &[
            Step::Upload { node: 0 },
            lost,
            Step::Commit { node: 0, rows: 1 },
            Step::Upload { node: 0 },
            Step::CrashMidCommit { node: 0, rows: 1 },
        ],
    );
    replay(
        2,
        &[
            lost,
            Step::Commit { node: 0, rows: 1 },
            Step::Upload { node: 0 },
            Step::Commit { node: 0, rows: 1 },
            Step::Kill { node: 0 },
        ],
    );
}

/// A follower lays out the head, is killed and restarts: its file already
/// is the head, so the stand-in returned without publishing the applied
/// txid, and take_over kept it catching-up for ever ("applied txid 0 of the
/// bucket's 1"). The real follower publishes the head once its file hashes
/// to it; the stand-in now does the same.
#[test]
fn model_restarted_follower_at_the_head_can_take_over() {
    replay(
        2,
        &[
            Step::Commit { node: 0, rows: 1 },
            Step::Upload { node: 0 },
            Step::Follow { node: 1 },
            Step::Expire,
            Step::Kill { node: 1 },
        ],
    );
}

/// A deposed primary uploads after another node took over: its segment for
/// txid 1 is stored (create-only) before its manifest compare-and-swap
/// fails. The new primary's own txid 1 then found the key taken by "another
/// primary" and could never publish. The new primary now replaces a
/// deposed epoch's segment for txids the manifest gives to its own epoch.
#[test]
fn model_deposed_primarys_segment_does_not_block_the_new_primary() {
    replay(
        3,
        &[
            Step::Expire,
            Step::Upload { node: 0 },
            Step::Commit { node: 0, rows: 1 },
            Step::Follow { node: 1 },
            Step::Tick { node: 1 },
            Step::Upload { node: 0 },
            Step::Commit { node: 0, rows: 1 },
        ],
    );
}
