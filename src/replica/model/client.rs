//! The primary's client (commits, checkpoints), upload rounds and the
//! follower stand-in.

use super::*;

impl World<'_> {
    // ── the primary's client ────────────────────────────────────────────────

    pub(super) fn commit(&mut self, i: usize, rows: u8, crash: bool) -> Check {
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
        let kernel = up.node.capture().tails().io(DB) == super::super::tail::Io::Armed;
        let route = if crash || kernel {
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
        if kernel {
            // Acknowledged by SQLite; capture reads it from the WAL later.
            self.note(format!("  {name}: acknowledged {new:?}, not tailed yet"));
            self.stat("acknowledged commits served by the kernel");
            let sim = &mut self.nodes[i];
            if sim.pending.is_empty() {
                sim.pending_base = before.as_ref().map(|b| (b.generation, b.head_txid));
            }
            sim.pending.push(Pending {
                pre,
                post: post.clone(),
                ids: new.clone(),
            });
            self.acks.push(Ack {
                node: i,
                txid: 0,
                ids: new,
            });
            self.nodes[i].img = Some(post);
            return Ok(());
        }
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

    pub(super) fn client_sql(&mut self, i: usize, close: bool) -> Check {
        if self.role(i) != Some(Role::Primary) {
            return Ok(());
        }
        let name = self.nodes[i].name.clone();
        let up = self.nodes[i].up.as_mut().unwrap();
        let Some(c) = up.conn.take() else {
            return Ok(());
        };
        let route = match up.node.capture().tails().io(DB) {
            super::super::tail::Io::Armed => unreported(),
            _ => to_node(up.node.clone()),
        };
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
    /// The tailer's part, after each step: what capture read from the WAL
    /// (a tail, an upload round's catch-up, a role change's last look, a
    /// start's recovery) gets its txids; databases are armed and let go as
    /// the tailer thread would.
    pub(super) fn sync_tails(&mut self) -> Check {
        for i in 0..self.nodes.len() {
            self.account_tailed(i)?;
            if !self.tailing {
                continue;
            }
            let backing = self.nodes[i].backing.clone();
            if let Some(up) = &self.nodes[i].up {
                // The databases the tailer thread looks after.
                use super::super::tail::Tailed;
                let c = up.node.capture();
                if c.databases().iter().any(|d| d == DB)
                    || c.tails().io(DB) != super::super::tail::Io::Off
                {
                    c.tails().model_tick(DB, &backing);
                }
            }
        }
        Ok(())
    }

    fn account_tailed(&mut self, i: usize) -> Check {
        if self.nodes[i].pending.is_empty() {
            return Ok(());
        }
        let Some(up) = &self.nodes[i].up else {
            return Ok(());
        };
        let head = up.journal.head(DB).unwrap();
        let Some((g0, t0)) = self.nodes[i].pending_base else {
            // Committed before the database had a journal head: recovery
            // made the first generation of it, base image and all.
            if head.is_some() {
                self.nodes[i].pending.clear();
            }
            return Ok(());
        };
        let Some(h) = head else { return Ok(()) };
        if h.generation != g0 {
            // Recovery started a new generation: they are in its base image
            // (the start's candidate).
            self.nodes[i].pending.clear();
            self.nodes[i].pending_base = None;
            return Ok(());
        }
        if h.head_txid <= t0 {
            return Ok(());
        }
        let k = ((h.head_txid - t0) as usize).min(self.nodes[i].pending.len());
        let name = self.nodes[i].name.clone();
        let txns = up_journal(&self.nodes[i])
            .txns(DB, t0, t0 + k as u64, 0)
            .map_err(|e| e.to_string())?;
        let done: Vec<Pending> = self.nodes[i].pending.drain(..k).collect();
        for (j, p) in done.into_iter().enumerate() {
            let txid = t0 + 1 + j as u64;
            let epoch = txns.iter().find(|t| t.txid == txid).map(|t| t.epoch);
            self.cands.entry(txid).or_default().push(Cand {
                image: p.post,
                pre: Some(p.pre),
                epoch,
                what: format!("{name}'s commit, tailed"),
            });
            for a in self
                .acks
                .iter_mut()
                .filter(|a| a.node == i && a.ids == p.ids)
            {
                a.txid = txid;
            }
            self.note(format!("  {name}: txid {txid} tailed {:?}", p.ids));
            self.stat("commits tailed from the WAL");
        }
        self.nodes[i].pending_base = Some((g0, t0 + k as u64));
        Ok(())
    }

    /// The tailer looks at the WAL now (a step of its own: its timing
    /// against the other steps is what the model explores).
    pub(super) fn tail(&mut self, i: usize) -> Check {
        let Some(up) = &self.nodes[i].up else {
            return Ok(());
        };
        let c = up.node.capture();
        if !c.tails().writers_allowed() || c.tails().io(DB) != super::super::tail::Io::Armed {
            return Ok(());
        }
        c.tail(DB)
            .map(|_| ())
            .map_err(|e| format!("{}: tailing failed: {e}", self.nodes[i].name))
    }

    pub(super) fn drop_stale_clients(&mut self) {
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

    pub(super) fn upload(&mut self, i: usize) -> Check {
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
    pub(super) fn follow(&mut self, i: usize) -> Check {
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
}
