//! Publishing: the journal's transactions as create-only segments, the
//! manifest advanced by compare-and-swap, then the replicated files.

use super::*;

impl Uploader {
    pub(super) async fn advance(
        &mut self,
        db: &str,
        expect_head: Option<u64>,
        f: impl Fn(&mut Manifest),
    ) -> Result<()> {
        self.advance_with(Some((db, expect_head)), f).await
    }

    /// Advance the manifest with `f`, retrying on a lost race as long as the
    /// database's head in the bucket is still the one we build on. A manifest
    /// at a newer epoch means another node took over: this one is fenced.
    pub(super) async fn advance_with(
        &mut self,
        expect: Option<(&str, Option<u64>)>,
        f: impl Fn(&mut Manifest),
    ) -> Result<()> {
        let db = expect.map(|(db, _)| db).unwrap_or("manifest");
        for _ in 0..5 {
            let v = self.current().await?;
            let ours = self.epoch.load(Ordering::Acquire);
            if v.manifest.epoch > ours {
                return Err(UploadError::Fenced(format!(
                    "the manifest moved to epoch {}, this node wrote under epoch {ours}",
                    v.manifest.epoch
                )));
            }
            let expect_head = expect.and_then(|(_, h)| h);
            let found = v.manifest.databases.get(db).map(|d| d.head_txid);
            if expect_head.is_some() && found != expect_head {
                return Err(Conflict::HeadMoved {
                    db: db.to_string(),
                    found,
                    expected: expect_head,
                }
                .into());
            }
            let mut next = v.manifest.clone();
            f(&mut next);
            next.updated_at = chrono::Utc::now().to_rfc3339();
            next.updated_by = self.node_id.clone();
            match manifest::swap(self.store.as_ref(), &self.layout, Some(&v.etag), &next).await {
                Ok(etag) => {
                    self.manifest = Some(Versioned {
                        manifest: next,
                        etag,
                    });
                    return Ok(());
                }
                Err(StoreError::PreconditionFailed { .. }) => self.manifest = None,
                Err(e) => return Err(e.into()),
            }
        }
        Err(Conflict::ManifestRaced { db: db.to_string() }.into())
    }

    pub(super) async fn publish_db(&mut self, h: DbHead) -> Result<()> {
        if h.page_size == 0 || self.journal.divergent_through(&h.name)?.is_some() {
            return Ok(()); // nothing yet, or a history set aside: never uploaded
        }
        let v = self.current().await?;
        let in_bucket = v.manifest.databases.get(&h.name).cloned();
        // A generation starts with its base snapshot.
        let started = in_bucket
            .as_ref()
            .is_some_and(|d| d.generation == h.generation && d.head_txid >= h.base_txid);
        if !started {
            self.publish_snapshot(&h, h.base_txid, None).await?;
        }
        let mut uploaded = self
            .journal
            .head(&h.name)?
            .map(|x| x.uploaded_txid.max(h.base_txid))
            .unwrap_or(h.base_txid);
        if let Some(d) = self
            .manifest
            .as_ref()
            .and_then(|v| v.manifest.databases.get(&h.name))
            .cloned()
        {
            let t = d.head_txid.min(h.head_txid);
            if t > uploaded && d.generation == h.generation && t == d.head_txid {
                // The bucket's head is this node's own transaction whose
                // publication was never confirmed (a lost answer, or a crash
                // right after the manifest moved): it is published. Without
                // this the journal counts it as backlog for ever.
                let own = self.journal.txns(&h.name, t - 1, t, 0)?;
                if own.first().map(|x| x.post_checksum) == manifest::parse_hex64(&d.head_checksum) {
                    self.journal.mark_uploaded(&h.name, t)?;
                }
            }
            uploaded = uploaded.max(t);
        }
        while uploaded < h.head_txid {
            let txns =
                self.journal
                    .txns(&h.name, uploaded, h.head_txid, self.policy.segment_bytes)?;
            let (Some(first), Some(last)) = (txns.first(), txns.last()) else {
                break;
            };
            let (from, to, post, size) = (
                first.txid,
                last.txid,
                last.post_checksum,
                last.db_size_pages,
            );
            let meta = SegmentMeta {
                db_name: h.name.clone(),
                node_id: self.node_id.clone(),
                page_size: h.page_size,
                created_ms: now_ms(),
            };
            let body = Bytes::from(codec::encode_segment(&meta, &txns)?);
            let key = self.layout.segment(&h.name, from, to);
            let bytes = body.len();
            match self
                .store
                .put(&key, body.clone(), PutMode::CreateOnly)
                .await
            {
                Ok(_) => self
                    .status
                    .metrics()
                    .uploaded(&h.name, Object::Segment, bytes as u64),
                Err(StoreError::PreconditionFailed { .. }) => {
                    self.check_existing(&key, post, &h.name, from, body).await?
                }
                Err(e) => return Err(e.into()),
            }
            let gen = h.generation;
            let ps = h.page_size;
            let name = h.name.clone();
            self.advance(&h.name, Some(from - 1), |m| {
                if let Some(d) = m.databases.get_mut(&name) {
                    d.head_txid = to;
                    d.head_checksum = hex64(post);
                    d.size_pages = size;
                    d.page_size = ps;
                    d.generation = gen;
                }
            })
            .await?;
            self.journal.mark_uploaded(&h.name, to)?;
            uploaded = to;
            tracing::debug!(db = %h.name, from, to, bytes, "segment published");
            self.status.published(&h.name, to);
        }
        let since = self.journal.since_base(&h.name)?;
        if since.0 >= self.policy.snapshot_txns || since.1 >= self.policy.snapshot_bytes {
            self.snapshot_now(&h.name).await?;
        }
        Ok(())
    }

    /// Replicated files, after the databases of the same round: a marker must
    /// not reach a secondary before the database state it describes. The first
    /// round as primary reconciles with the bucket first.
    pub(super) async fn publish_files(&mut self) -> Result<()> {
        let node = self.node.clone();
        let recorder = node.capture().files();
        if !self.files_reconciled {
            self.manifest = None; // the latest, not what this node last wrote
            let v = self.current().await?;
            let backing = node.capture().backing_dir();
            crate::replica::files::reconcile(
                self.store.as_ref(),
                &v.manifest,
                &backing,
                recorder,
                node.invalidator(),
            )
            .await?;
            self.files_reconciled = true;
        }
        let pending = recorder.take();
        if pending.is_empty() {
            return Ok(());
        }
        let res = self.put_files(&pending).await;
        if res.is_err() {
            recorder.put_back(pending);
        }
        res
    }

    pub(super) async fn put_files(
        &mut self,
        pending: &std::collections::BTreeMap<String, crate::replica::files::Version>,
    ) -> Result<()> {
        let v = self.current().await?;
        let changes = crate::replica::files::changes(&self.layout, &v.manifest, pending);
        if changes.is_empty() {
            return Ok(());
        }
        for (_, c) in &changes {
            let Some((e, body)) = c else { continue };
            match self
                .store
                .put(&e.key, body.clone(), PutMode::CreateOnly)
                .await
            {
                // The key is the content's hash: taken means already there.
                Ok(_) | Err(StoreError::PreconditionFailed { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.advance_with(None, |m| crate::replica::files::apply(m, &changes))
            .await?;
        for (name, c) in &changes {
            match c {
                Some((e, _)) => {
                    tracing::info!(file = %name, sha256 = %e.sha256, size = e.size, "replicated file published")
                }
                None => tracing::info!(file = %name, "replicated file's deletion published"),
            }
        }
        Ok(())
    }

    /// No longer primary: versions not published by now are not this node's
    /// to publish any more (the bucket's win; see `super::files`).
    pub(super) fn drop_files(&mut self) {
        self.files_reconciled = false;
        let dropped = self.node.capture().files().take();
        if !dropped.is_empty() {
            tracing::warn!(
                files = ?dropped.keys().collect::<Vec<_>>(),
                "no longer primary: unpublished versions of replicated files dropped"
            );
        }
    }

    /// A create-only put found the key taken: fine if it is our own earlier
    /// upload (a crash between the put and the manifest); replaced if it is
    /// a deposed primary's (see below); a conflict otherwise.
    pub(super) async fn check_existing(
        &self,
        key: &str,
        post: u64,
        db: &str,
        from: u64,
        body: Bytes,
    ) -> Result<()> {
        let got = self.store.get(key).await?;
        let h = codec::parse_segment_header(&got.body)?;
        let ours = self.epoch.load(Ordering::Acquire);
        let owner = self
            .manifest
            .as_ref()
            .and_then(|v| v.manifest.epoch_of(db, from));
        if h.post_checksum == post {
            Ok(())
        } else if h.epoch < ours && owner == Some(ours) {
            // A deposed primary wrote these txids before its manifest
            // compare-and-swap failed: the manifest gives them to this
            // epoch, so no reader takes that segment, and it would block
            // this primary's publication for ever (keys are txid ranges).
            tracing::warn!(
                key,
                node = %h.node_id,
                epoch = h.epoch,
                "replacing a deposed primary's unpublished segment"
            );
            self.store.put(key, body, PutMode::Overwrite).await?;
            Ok(())
        } else if h.epoch > ours {
            Err(UploadError::Fenced(format!(
                "{key} was written under epoch {} by {}, a newer primary",
                h.epoch, h.node_id
            )))
        } else {
            Err(Conflict::SegmentTaken {
                key: key.to_string(),
                node: h.node_id.clone(),
                epoch: h.epoch,
            }
            .into())
        }
    }
}
