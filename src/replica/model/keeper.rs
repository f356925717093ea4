//! Stand-ins for `LeaseKeeper` and `roles::drive_roles`: keeper steps, expiry,
//! release, hand-over, promotion and fencing, with the real decisions.

use super::*;

impl World<'_> {
    // ── lease keeper and roles (stand-in for LeaseKeeper + drive_roles) ─────

    /// One keeper step, then the role rules of `roles::drive_roles`.
    pub(super) fn tick(&mut self, i: usize) -> Check {
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
    pub(super) fn not_held(&mut self, i: usize) {
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
    pub(super) fn promote(&mut self, i: usize, e: u64) -> Check {
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
    pub(super) fn promoted_on_journal_head(&self, i: usize) -> Check {
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
    pub(super) fn publish_applied(&self, i: usize, txid: u64) {
        if let Some(up) = &self.nodes[i].up {
            up.node.views().saw_head(DB, txid);
            up.node.views().applied(DB, txid);
        }
    }

    /// The secondary's view, settled: its WAL folded into the main file by
    /// a checkpoint (the applier's), nothing reported to capture.
    pub(super) fn settle_view(&self, i: usize) {
        let path = self.db_path(i);
        if !path.exists() {
            return;
        }
        if let Ok(c) = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_WRITE) {
            let _ = c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
        }
    }

    /// The holder of the lease in the bucket, if it runs and knows it.
    pub(super) fn holder(&self) -> Option<usize> {
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
    pub(super) fn expire(&mut self) {
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

    pub(super) fn release(&mut self) {
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
    pub(super) fn hand_over(&mut self, to: usize) -> Check {
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
    pub(super) fn fenced_by_uploader(&self, i: usize, e: &UploadError) {
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
}
