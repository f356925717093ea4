//! The world's set-up, the daemon lifecycle (start, kill -9), faults and the
//! step dispatch.

use super::*;

impl<'r> World<'r> {
    pub(super) fn new(rt: &'r tokio::runtime::Runtime, nodes: usize) -> World<'r> {
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
                    pending: Vec::new(),
                    pending_base: None,
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
            tailing: false,
        }
    }

    pub(super) fn stat(&mut self, what: &'static str) {
        *self.stats.entry(what).or_default() += 1;
    }

    pub(super) fn note(&mut self, s: impl Into<String>) {
        self.trace.push(s.into());
    }

    pub(super) fn tmp_path(&mut self, what: &str) -> PathBuf {
        self.tmp_n += 1;
        self.tmp.join(format!("{what}-{}.db", self.tmp_n))
    }

    /// Node 0 starts with claude-mem's database already there (WAL mode, a
    /// table, no rows): its first capture makes it generation 1 at txid 0.
    pub(super) fn seed(&mut self) {
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

    pub(super) fn role(&self, i: usize) -> Option<Role> {
        self.nodes[i].up.as_ref().map(|u| u.node.role())
    }

    pub(super) fn db_path(&self, i: usize) -> PathBuf {
        self.nodes[i].backing.join(DB)
    }

    // ── daemon lifecycle ────────────────────────────────────────────────────

    /// Start node `i` as `daemon::start_replication` does, then take one
    /// keeper step.
    pub(super) fn start(&mut self, i: usize) -> Check {
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
        let root = crate::replica::capture::open_root(&sim.backing);
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
            UploadSettings {
                project_id: "p".into(),
                canonical_id: CID.into(),
                node_id: sim.name.clone(),
                policy: policy(),
            },
            store.clone(),
            UploadShared {
                journal: journal.clone(),
                base_dir: base_dir.clone(),
                epoch: epoch.clone(),
                wake,
                status,
                node: node.clone(),
            },
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
    pub(super) fn kill(&mut self, i: usize) {
        if let Some(mut up) = self.nodes[i].up.take() {
            if let Some(c) = up.conn.take() {
                with_route(unreported(), || drop(c));
            }
        }
    }

    // ── faults ──────────────────────────────────────────────────────────────

    pub(super) fn fault(&mut self, i: usize, f: FaultKind) {
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

    pub(super) fn step(&mut self, s: Step) -> Check {
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
            Step::Tail { node } => self.tail(m(node)),
        }
    }
}
