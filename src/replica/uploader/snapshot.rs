//! Snapshots from the local base image, `membridge push`, and pruning past
//! the retention period.

use super::*;

impl Uploader {
    /// `membridge push`: publish the backlog, then a snapshot of every database.
    pub async fn push(&mut self) -> Result<String> {
        let role = self.node.role();
        if !role.publishes() {
            return Err(UploadError::Refused(format!(
                "this node is {} — only the primary publishes",
                role.name()
            )));
        }
        self.manifest = None;
        self.round().await?;
        let mut done = Vec::new();
        for h in self.journal.heads()? {
            if h.page_size == 0 {
                continue;
            }
            self.snapshot_now(&h.name).await?;
            let txid = self
                .journal
                .head(&h.name)?
                .map(|x| x.base_txid)
                .unwrap_or(0);
            done.push(format!("{} at txid {txid}", h.name));
        }
        self.refresh_backlog();
        Ok(if done.is_empty() {
            "nothing to publish: no replicated database yet".into()
        } else {
            format!("published snapshot of {}", done.join(", "))
        })
    }

    /// Take a snapshot at the head of what is uploaded: advance the base image
    /// with journaled transactions, then publish it.
    pub async fn snapshot_now(&mut self, db: &str) -> Result<()> {
        let Some(h) = self.journal.head(db)? else {
            return Ok(());
        };
        let target = h.uploaded_txid;
        if target > h.base_txid {
            let (journal, base_dir, name) =
                (self.journal.clone(), self.base_dir.clone(), db.to_string());
            let h2 = h.clone();
            tokio::task::spawn_blocking(move || advance_base(&journal, &base_dir, &h2, target))
                .await
                .map_err(|source| Conflict::Task {
                    what: format!("{name}: base builder"),
                    source,
                })??;
        }
        let h = self.journal.head(db)?.expect("head exists");
        self.publish_snapshot(&h, h.base_txid, Some(h.base_txid))
            .await
    }

    /// Upload the base image at `txid` as a snapshot and point the manifest at it.
    /// `on_head`: the manifest head it must already be at (None: a generation start).
    pub(super) async fn publish_snapshot(
        &mut self,
        h: &DbHead,
        txid: u64,
        on_head: Option<u64>,
    ) -> Result<()> {
        let path = base_path(&self.base_dir, &h.name, txid);
        let io = |source| UploadError::Io {
            db: h.name.clone(),
            source,
        };
        // Hashing and compressing a large image takes seconds: off the
        // runtime's workers, which also renew the lease. Both stream from the
        // file, and the object goes to a file the upload reads as it sends:
        // memory does not grow with the database.
        let (db_name, node_id) = (h.name.clone(), self.node_id.clone());
        let (epoch, page_size) = (self.epoch.load(Ordering::Relaxed), h.page_size);
        let image_path = path.clone();
        let body = TempFile(path.with_extension("snapshot.tmp"));
        let body_path = body.0.clone();
        let (hashes, bytes) = tokio::task::spawn_blocking(move || -> Result<_> {
            let hashes = PageHashes::from_file(&image_path, page_size).map_err(|source| {
                UploadError::Io {
                    db: db_name.clone(),
                    source,
                }
            })?;
            let meta = SnapshotMeta {
                db_name,
                node_id,
                txid,
                epoch,
                page_size,
                page_count: hashes.page_count(),
                db_checksum: hashes.checksum(),
                timestamp_ms: now_ms(),
            };
            let len = codec::encode_snapshot_file(meta, &image_path, &body_path)?;
            Ok((hashes, len))
        })
        .await
        .map_err(|e| io(std::io::Error::other(e.to_string())))??;
        let key = self.layout.snapshot(&h.name, txid);
        let put = self
            .store
            .put_file(&key, &body.0, PutMode::CreateOnly)
            .await;
        drop(body);
        match put {
            Ok(_) => self
                .status
                .metrics()
                .uploaded(&h.name, Object::Snapshot, bytes),
            Err(StoreError::PreconditionFailed { .. }) => {
                let got = self.store.get_range(&key, 0, 4096).await?;
                let found = codec::SnapshotReader::parse_header(&got)?;
                if found.db_checksum != hashes.checksum() {
                    return Err(Conflict::SnapshotTaken {
                        key: key.to_string(),
                        node: found.node_id.clone(),
                    }
                    .into());
                }
            }
            Err(e) => return Err(e.into()),
        }
        let snap = SnapshotRef {
            txid,
            key: key.clone(),
            checksum: hex64(hashes.checksum()),
            size_pages: hashes.page_count(),
            taken_at: chrono::Utc::now().to_rfc3339(),
        };
        let (name, gen, ps) = (h.name.clone(), h.generation, h.page_size);
        let checksum = hashes.checksum();
        let size = hashes.page_count();
        self.advance(&h.name, on_head, move |m| {
            let d = m
                .databases
                .entry(name.clone())
                .or_insert_with(|| DbManifest {
                    generation: gen,
                    head_txid: txid,
                    head_checksum: hex64(checksum),
                    page_size: ps,
                    size_pages: size,
                    snapshot: None,
                    older_snapshots: Vec::new(),
                });
            if on_head.is_none() {
                // A new generation: history restarts at this image.
                d.generation = gen;
                d.head_txid = txid;
                d.head_checksum = hex64(checksum);
                d.page_size = ps;
                d.size_pages = size;
            }
            if let Some(old) = d.snapshot.replace(snap.clone()) {
                if old.txid != snap.txid {
                    d.older_snapshots.push(old);
                }
            }
        })
        .await?;
        if on_head.is_none() {
            self.journal.mark_uploaded(&h.name, txid)?;
        }
        tracing::info!(db = %h.name, txid, key = %key, "snapshot published");
        self.status.snapshot_published(&h.name, txid);
        if h.name == crate::replica::legacy::LEGACY_DB {
            // Nodes still on the old tool pull this; a failure here must not
            // stop replication, so it is logged, not returned.
            if let Err(e) = crate::replica::legacy::publish(
                self.store.as_ref(),
                &self.layout,
                &self.project_id,
                &self.canonical_id,
                &self.node_id,
                &path,
                Some(txid),
            )
            .await
            {
                tracing::warn!(error = %e, "legacy snapshot not published");
            }
        }
        Ok(())
    }

    /// Delete snapshots and segments older than the retention period, keeping
    /// the newest snapshot older than the cut-off so restore still reaches it.
    pub(super) async fn prune(&mut self) -> Result<()> {
        let Some(v) = self.manifest.clone() else {
            return Ok(());
        };
        let cutoff = chrono::Utc::now()
            - chrono::Duration::from_std(self.policy.retention)
                .unwrap_or(chrono::Duration::days(7));
        let mut changed = Vec::new();
        for (db, d) in &v.manifest.databases {
            let keep_from = d
                .older_snapshots
                .iter()
                .chain(d.snapshot.iter())
                .filter(|s| {
                    chrono::DateTime::parse_from_rfc3339(&s.taken_at)
                        .is_ok_and(|t| t.with_timezone(&chrono::Utc) <= cutoff)
                })
                .map(|s| s.txid)
                .max();
            let Some(keep_from) = keep_from else {
                continue;
            };
            for o in self.store.list(&self.layout.snapshot_prefix(db)).await? {
                if let Some(k) = self.layout.parse_snapshot(&o.key) {
                    if k.txid < keep_from {
                        self.store.delete(&o.key).await?;
                    }
                }
            }
            for o in self.store.list(&self.layout.segment_prefix(db)).await? {
                if let Some(k) = self.layout.parse_segment(&o.key) {
                    if k.to <= keep_from {
                        self.store.delete(&o.key).await?;
                    }
                }
            }
            changed.push((db.clone(), keep_from));
        }
        if !changed.is_empty() {
            for (db, keep_from) in changed {
                let head = v.manifest.databases.get(&db).map(|d| d.head_txid);
                self.advance(&db, head, |m| {
                    if let Some(d) = m.databases.get_mut(&db) {
                        d.older_snapshots.retain(|s| s.txid >= keep_from);
                    }
                })
                .await?;
            }
        }
        Ok(())
    }
}

/// A file removed when dropped: a snapshot body lives only as long as its upload.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Advance the base image to `to` and drop the journal's covered transactions.
fn advance_base(journal: &Journal, base_dir: &Path, h: &DbHead, to: u64) -> Result<()> {
    let to_path = base_path(base_dir, &h.name, to);
    materialize(journal, base_dir, h, to, &to_path).map_err(|e| match e {
        BaseError::Journal(j) => UploadError::Journal(j),
        other => Conflict::Base(other).into(),
    })?;
    journal.set_base(&h.name, to)?;
    let old = base_path(base_dir, &h.name, h.base_txid);
    let _ = std::fs::remove_file(&old);
    // A snapshot body a crash left behind mid-upload.
    let _ = std::fs::remove_file(old.with_extension("snapshot.tmp"));
    Ok(())
}
