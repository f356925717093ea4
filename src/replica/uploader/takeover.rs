//! Taking over: check that the bucket's history is this node's, then bump
//! the manifest's epoch so a deposed primary's next swap fails.

use super::*;

impl Uploader {
    /// The lease came to this node at `epoch`. Writes may resume only if every
    /// database the bucket knows continues this node's own history; then the
    /// manifest's epoch moves to `epoch`, so a deposed primary's next
    /// compare-and-swap fails. A lost race on that swap means the manifest
    /// changed after it was judged (the old primary's last upload, say): the
    /// whole decision is taken again from the manifest as it now is.
    pub async fn take_over(&mut self, epoch: u64) -> Result<()> {
        self.files_reconciled = false;
        let start = Instant::now();
        let res = self.take_over_once(epoch).await;
        if res.is_ok() {
            tracing::info!(
                epoch,
                ms = start.elapsed().as_millis() as u64,
                "take-over done (manifest read, view settled, head adopted, epoch swapped)"
            );
        }
        res
    }

    pub(super) async fn take_over_once(&mut self, epoch: u64) -> Result<()> {
        for _ in 0..5 {
            self.manifest = None;
            let v = self.current().await?;
            if v.manifest.epoch > epoch {
                return Err(UploadError::EpochBehind(NotYet::EpochBehind {
                    manifest: v.manifest.epoch,
                    lease: epoch,
                }));
            }
            let starts = self.take_over_starts(&v).await?;
            if v.manifest.epoch == epoch && v.manifest.epochs.iter().any(|x| x.epoch == epoch) {
                return self.took_over(epoch); // bumped already (an earlier try's lost answer)
            }
            let mut next = v.manifest.clone();
            next.epoch = epoch;
            next.epochs.retain(|x| x.epoch != epoch);
            next.epochs.push(EpochStart {
                epoch,
                start_txid: starts,
            });
            next.updated_at = chrono::Utc::now().to_rfc3339();
            next.updated_by = self.node_id.clone();
            match manifest::swap(self.store.as_ref(), &self.layout, Some(&v.etag), &next).await {
                Ok(etag) => {
                    self.manifest = Some(Versioned {
                        manifest: next,
                        etag,
                    });
                    return self.took_over(epoch);
                }
                Err(StoreError::PreconditionFailed { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(Conflict::TakeOverRaced.into())
    }

    pub(super) fn took_over(&self, epoch: u64) -> Result<()> {
        self.journal.note_epoch(epoch)?;
        tracing::info!(epoch, "manifest epoch advanced; this node is the primary");
        Ok(())
    }

    /// Where the new epoch starts for each database, if every database in `v`
    /// continues this node's history (a secondary's copy at the bucket's head
    /// is adopted first); a conflict saying why not otherwise.
    pub(super) async fn take_over_starts(
        &mut self,
        v: &Versioned,
    ) -> Result<std::collections::BTreeMap<String, u64>> {
        let mut starts = std::collections::BTreeMap::new();
        for (db, d) in &v.manifest.databases {
            // The follower says it has not applied the head yet: settling
            // and hashing now would be wasted (and slow it down); it was
            // asked to look now and this is tried again shortly.
            let applied = self.node.views().get(db).map(|v| v.applied_txid);
            let journaled = self.journal.head(db)?;
            let parent = self.journal.parent(db)?;
            // A new local generation on top of exactly the bucket's head is
            // ahead of it, not behind (the follower leaves it alone).
            let behind = applied.is_some_and(|a| a < d.head_txid)
                && journaled.as_ref().is_none_or(|j| {
                    (j.generation != d.generation || j.head_txid < d.head_txid)
                        && !crate::replica::divergent::on_top(j, parent, d)
                })
                && self.node.all_local();
            if behind {
                return Err(Conflict::Behind {
                    db: db.clone(),
                    applied: applied.unwrap_or(0),
                    head: d.head_txid,
                }
                .into());
            }
            // The view's WAL is SQLite's own on a secondary: fold it into the
            // main file first, so the file is the head and capture starts on
            // an empty WAL (docs/ARCHITECTURE.md, "Promotion").
            let node = self.node.clone();
            let name = db.clone();
            let t = Instant::now();
            let settled = tokio::task::spawn_blocking(move || {
                let settled = node.settle_view(&name)?;
                if settled {
                    node.capture().forget_wal(&name);
                }
                Ok::<bool, String>(settled)
            })
            .await
            .map_err(|source| Conflict::Task {
                what: format!("{db}: settling the view"),
                source,
            })?
            .map_err(|why| Conflict::SettleView {
                db: db.clone(),
                why,
            })?;
            if settled {
                tracing::info!(db, ms = t.elapsed().as_millis() as u64, "view settled");
            }
            let mut local = self.journal.head(db)?;
            let own_unconfirmed = local.as_ref().is_some_and(|j| {
                j.generation == d.generation
                    && j.uploaded_txid < d.head_txid
                    && d.head_txid < j.head_txid
            });
            if own_unconfirmed {
                // The bucket's head is within this node's unpublished
                // history: its own upload whose answer was lost (before a
                // restart, say) if the checksums agree. Then it is published,
                // and the rest continues it; otherwise this node would wait
                // in catching-up for ever.
                let own = self.journal.txns(db, d.head_txid - 1, d.head_txid, 0)?;
                if own.first().map(|x| x.post_checksum) == manifest::parse_hex64(&d.head_checksum) {
                    self.journal.mark_uploaded(db, d.head_txid)?;
                    local = self.journal.head(db)?;
                }
            }
            let parent = self.journal.parent(db)?;
            // A history whose tail was set aside as divergent cannot go on:
            // the bucket's history went another way.
            let continues = |j: &DbHead, aside: bool| {
                if aside {
                    return false;
                }
                let same = j.generation == d.generation
                    && ((j.head_txid == d.head_txid
                        && Some(j.head_checksum) == manifest::parse_hex64(&d.head_checksum))
                        || (j.head_txid > d.head_txid && j.uploaded_txid == d.head_txid));
                // This node restarted history from its own database (changed
                // outside membridge) on top of exactly the bucket's head.
                let newer = crate::replica::divergent::on_top(j, parent, d);
                same || newer
            };
            let aside = self.journal.divergent_through(db)?.is_some();
            let ours = local.as_ref().is_some_and(|j| continues(j, aside));
            if !ours && !self.node.all_local() {
                return Err(Conflict::Hydrating { db: db.clone() }.into());
            }
            if !ours {
                // A secondary being promoted: its follower's copy, if it is
                // exactly the bucket's head, becomes the start of its history.
                let node = self.node.clone();
                let (name, d2) = (db.clone(), d.clone());
                let t = Instant::now();
                let adopted = tokio::task::spawn_blocking(move || node.capture().adopt(&name, &d2))
                    .await
                    .map_err(|source| Conflict::Task {
                        what: format!("{db}: adopting the bucket's head"),
                        source,
                    })?
                    .map_err(Conflict::Adopt)?;
                if adopted {
                    tracing::info!(db, ms = t.elapsed().as_millis() as u64, "head adopted");
                    local = self.journal.head(db)?;
                }
            }
            let aside = self.journal.divergent_through(db)?.is_some();
            let ours = local.as_ref().is_some_and(|j| continues(j, aside));
            if !ours {
                return Err(Conflict::NotOurs {
                    db: db.clone(),
                    head: d.head_txid,
                    generation: d.generation,
                    local: local
                        .map(|j| {
                            format!(
                                "{} (generation {}, base {})",
                                j.head_txid, j.generation, j.base_txid
                            )
                        })
                        .unwrap_or_else(|| "nothing".into()),
                }
                .into());
            }
            starts.insert(db.clone(), local.map_or(d.head_txid, |j| j.head_txid) + 1);
        }
        for h in self.journal.heads()? {
            if !v.manifest.databases.contains_key(&h.name) {
                // The bucket has no history of it to diverge from.
                self.journal.clear_divergent(&h.name)?;
            }
            starts.entry(h.name.clone()).or_insert(h.head_txid + 1);
        }
        Ok(starts)
    }
}
