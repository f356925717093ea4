//! Planning a restore from the bucket: the head, the snapshot to start from,
//! the segments to its target and how forks among them are settled.

use super::*;

/// The manifest's head of one database, parsed.
pub(super) struct Head {
    pub(super) txid: u64,
    pub(super) checksum: u64,
    pub(super) page_size: u32,
    pub(super) size_pages: u32,
}

impl Head {
    pub(super) fn from_manifest(key: &str, db: &str, d: &DbManifest) -> Result<Head, RestoreError> {
        let bad = |why: String| RestoreError::MalformedManifest {
            key: key.to_string(),
            why: format!("database {db:?}: {why}"),
        };
        let checksum = parse_hex64(&d.head_checksum)
            .ok_or_else(|| bad(format!("head_checksum {:?} is not hex", d.head_checksum)))?;
        if !is_valid_page_size(d.page_size) {
            return Err(bad(format!(
                "page_size {} is not a valid page size",
                d.page_size
            )));
        }
        for s in d.snapshot.iter().chain(&d.older_snapshots) {
            if parse_hex64(&s.checksum).is_none() {
                return Err(bad(format!(
                    "snapshot {} checksum {:?} is not hex",
                    s.key, s.checksum
                )));
            }
            if s.txid > d.head_txid {
                return Err(bad(format!(
                    "snapshot {} at txid {} is past the head {}",
                    s.key, s.txid, d.head_txid
                )));
            }
        }
        Ok(Head {
            txid: d.head_txid,
            checksum,
            page_size: d.page_size,
            size_pages: d.size_pages,
        })
    }
}

/// A snapshot picked for the restore, header verified.
pub(super) struct ChosenSnapshot {
    pub(super) key: String,
    pub(super) size: u64,
    pub(super) header: SnapshotHeader,
    /// The header bytes already downloaded (the start of the object).
    pub(super) prefix: Bytes,
}

/// A segment on the planned chain, by its key.
#[derive(Debug, Clone)]
pub(super) struct SegInfo {
    pub(super) key: String,
    pub(super) from: u64,
    pub(super) to: u64,
    pub(super) size: u64,
}

pub(super) struct Ctx<'a> {
    pub(super) store: &'a dyn ObjectStore,
    pub(super) layout: &'a Layout,
    pub(super) manifest: &'a Manifest,
    pub(super) manifest_key: &'a str,
    pub(super) db: &'a str,
    pub(super) head: &'a Head,
}

impl Ctx<'_> {
    pub(super) async fn get_object(
        &self,
        key: &str,
        downloaded: &mut u64,
    ) -> Result<Bytes, RestoreError> {
        let got = self.store.get(key).await?;
        *downloaded += got.body.len() as u64;
        Ok(got.body)
    }

    pub(super) async fn get_range(
        &self,
        key: &str,
        start: u64,
        len: u64,
        downloaded: &mut u64,
    ) -> Result<Bytes, RestoreError> {
        let got = self.store.get_range(key, start, len).await?;
        *downloaded += got.len() as u64;
        Ok(got)
    }

    /// Accepts a segment or snapshot of `epoch` covering `txid` when the epoch
    /// history gives that txid to that epoch (or says nothing about it).
    pub(super) fn epoch_owner(&self, txid: u64) -> Option<u64> {
        self.manifest.epoch_of(self.db, txid)
    }

    /// The newest usable snapshot at or before the target.
    pub(super) async fn choose_snapshot(
        &self,
        target: Target,
        goal: u64,
        time_ms: Option<i64>,
        d: &DbManifest,
        downloaded: &mut u64,
    ) -> Result<ChosenSnapshot, RestoreError> {
        // Candidates: listed objects plus those the manifest names.
        struct Cand {
            txid: u64,
            key: String,
            size: Option<u64>,
            named: Option<SnapshotRef>,
        }
        let prefix = self.layout.snapshot_prefix(self.db);
        let mut cands: Vec<Cand> = Vec::new();
        for o in self.store.list(&prefix).await? {
            if let Some(k) = self.layout.parse_snapshot(&o.key) {
                if k.db == self.db {
                    cands.push(Cand {
                        txid: k.txid,
                        key: o.key,
                        size: Some(o.size),
                        named: None,
                    });
                }
            }
        }
        for r in d.snapshot.iter().chain(&d.older_snapshots) {
            match self.layout.parse_snapshot(&r.key) {
                Some(k) if k.db == self.db && k.txid == r.txid => {}
                _ => {
                    return Err(RestoreError::MalformedManifest {
                        key: self.manifest_key.to_string(),
                        why: format!(
                            "snapshot key {} is not the snapshot of {} at txid {}",
                            r.key, self.db, r.txid
                        ),
                    })
                }
            }
            match cands.iter_mut().find(|c| c.key == r.key) {
                Some(c) => c.named = Some(r.clone()),
                None => cands.push(Cand {
                    txid: r.txid,
                    key: r.key.clone(),
                    size: None,
                    named: Some(r.clone()),
                }),
            }
        }
        if cands.is_empty() {
            return Err(RestoreError::NoSnapshot {
                db: self.db.to_string(),
                prefix,
            });
        }
        // Above the head: a crashed upload or a fenced primary; never published.
        cands.retain(|c| c.txid <= self.head.txid);
        if cands.is_empty() {
            return Err(RestoreError::NoSnapshot {
                db: self.db.to_string(),
                prefix,
            });
        }
        cands.sort_by_key(|c| std::cmp::Reverse(c.txid));
        // The oldest snapshot looked at, for the "before" error.
        let mut oldest_seen: Option<(u64, String, i64)> = None;
        for c in &cands {
            if c.txid > goal {
                continue;
            }
            let Some(size) = c.size else {
                return Err(RestoreError::MissingSnapshot { key: c.key.clone() });
            };
            let want = size.min(SNAPSHOT_MAX_HEADER_LEN as u64);
            let prefix_bytes = self.get_range(&c.key, 0, want, downloaded).await?;
            let corrupt = |source| RestoreError::Corrupt {
                key: c.key.clone(),
                what: "snapshot",
                source,
            };
            let h = SnapshotReader::parse_header(&prefix_bytes).map_err(corrupt)?;
            oldest_seen = Some((c.txid, c.key.clone(), h.timestamp_ms));
            let mismatch = |why: String| RestoreError::Mismatch {
                key: c.key.clone(),
                why,
            };
            if h.db_name != self.db {
                return Err(mismatch(format!(
                    "snapshot of database {:?}, expected {:?}",
                    h.db_name, self.db
                )));
            }
            if h.txid != c.txid {
                return Err(mismatch(format!(
                    "snapshot header says txid {}, its key says {}",
                    h.txid, c.txid
                )));
            }
            if h.page_size != self.head.page_size {
                return Err(mismatch(format!(
                    "snapshot page size {} differs from the manifest's {}",
                    h.page_size, self.head.page_size
                )));
            }
            if let Some(r) = &c.named {
                let named = parse_hex64(&r.checksum).unwrap_or_default();
                if named != h.db_checksum || r.size_pages != h.page_count {
                    return Err(mismatch(format!(
                        "snapshot holds checksum {:016x} and {} pages, the manifest says {} and {}",
                        h.db_checksum, h.page_count, r.checksum, r.size_pages
                    )));
                }
            }
            // A snapshot older than the epoch that owns its txid comes from a
            // deposed primary: not the published history.
            if let Some(owner) = self.epoch_owner(h.txid) {
                if c.named.is_none() && h.epoch < owner {
                    continue;
                }
            }
            if let Some(t) = time_ms {
                if h.timestamp_ms > t {
                    continue;
                }
            }
            return Ok(ChosenSnapshot {
                key: c.key.clone(),
                size,
                header: h,
                prefix: prefix_bytes,
            });
        }
        let oldest = cands.last().expect("not empty");
        let earliest = match oldest_seen {
            Some((txid, key, ms)) if txid == oldest.txid => {
                let at = Utc
                    .timestamp_millis_opt(ms)
                    .single()
                    .map(|t| t.to_rfc3339())
                    .unwrap_or_else(|| ms.to_string());
                format!("txid {txid}, taken at {at}, {key}")
            }
            _ => format!("txid {}, {}", oldest.txid, oldest.key),
        };
        Err(RestoreError::BeforeSnapshots {
            target,
            db: self.db.to_string(),
            earliest,
        })
    }

    /// The segments that carry the chain from `start` (checksum `start_ck`)
    /// to `goal`, in order. Keys decide where they are unambiguous (each
    /// segment is verified when applied); where several segments start at the
    /// same txid, their headers decide: the epoch history first, then the
    /// checksum continuing the chain, then which one leads to the head.
    ///
    /// With `tolerant`, a break in the chain ends the plan instead of failing
    /// it, and comes back as the second value.
    pub(super) async fn plan_segments(
        &self,
        start: u64,
        start_ck: u64,
        goal: u64,
        tolerant: bool,
        downloaded: &mut u64,
    ) -> Result<(Vec<SegInfo>, Option<RestoreError>), RestoreError> {
        if start >= goal {
            return Ok((Vec::new(), None));
        }
        let prefix = self.layout.segment_prefix(self.db);
        let mut all: Vec<SegInfo> = Vec::new();
        for o in self.store.list(&prefix).await? {
            if let Some(k) = self.layout.parse_segment(&o.key) {
                // Past the head: never published (a crashed upload, a
                // deposed primary's tail).
                if k.db == self.db && k.to <= self.head.txid {
                    all.push(SegInfo {
                        key: o.key,
                        from: k.from,
                        to: k.to,
                        size: o.size,
                    });
                }
            }
        }
        all.sort_by_key(|s| (s.from, s.to));
        let mut headers = HeaderCache::default();
        let mut path: Vec<SegInfo> = Vec::new();
        let mut at = start;
        let mut ck = Some(start_ck);
        while at < goal {
            let mut cands: Vec<&SegInfo> = all.iter().filter(|s| s.from == at + 1).collect();
            let mut entering = false;
            if cands.is_empty() {
                // A snapshot need not fall on a segment boundary: enter a
                // segment that holds the next txid and skip what it has before.
                cands = all.iter().filter(|s| s.from <= at && s.to > at).collect();
                entering = true;
            }
            let step = match cands.len() {
                0 => Err(self.gap_error(&all, at, goal, &prefix)),
                1 => {
                    ck = None;
                    Ok(cands[0].clone())
                }
                _ if entering => {
                    ck = None;
                    self.settle_entry(&all, &cands, at, &mut headers, downloaded)
                        .await
                }
                _ => {
                    let here = match ck {
                        Some(c) => Ok(c),
                        None => {
                            let last = path.last().expect("a segment brought the chain here");
                            headers
                                .get(self, last, downloaded)
                                .await
                                .map(|h| h.post_checksum)
                        }
                    };
                    match here {
                        Ok(here) => {
                            self.settle_fork(&all, &cands, at, here, &mut headers, downloaded)
                                .await
                        }
                        Err(e) => Err(e),
                    }
                }
            };
            let chosen = match step {
                Ok(c) => c,
                Err(e) if tolerant => return Ok((path, Some(e))),
                Err(e) => return Err(e),
            };
            if cands.len() > 1 && !entering {
                ck = Some(headers.get(self, &chosen, downloaded).await?.post_checksum);
            }
            at = chosen.to;
            path.push(chosen);
        }
        Ok((path, None))
    }

    pub(super) fn gap_error(
        &self,
        all: &[SegInfo],
        at: u64,
        goal: u64,
        prefix: &str,
    ) -> RestoreError {
        // The segment that would come next (the first one beyond the chain)
        // names the gap best.
        let next = all
            .iter()
            .filter(|s| s.from > at + 1)
            .min_by_key(|s| s.from);
        match next {
            Some(s) => RestoreError::ChainGap {
                key: s.key.clone(),
                from: s.from,
                at,
            },
            _ => RestoreError::ChainEnds {
                prefix: prefix.to_string(),
                at,
                goal,
            },
        }
    }

    /// Whether segment `s` (header `h`) can continue a chain at `at` with
    /// checksum `here`: the shared check (module verify). `here` is not
    /// looked at when `s` starts before `at + 1` (entered part-way).
    pub(super) fn enters(
        &self,
        s: &SegInfo,
        h: &SegmentHeader,
        at: u64,
        here: u64,
    ) -> Result<(), VerifyError> {
        Chain::new(at, here).enters(
            &s.key,
            (s.from, s.to),
            h.epoch,
            h.pre_checksum,
            self.epoch_owner(h.txid_to),
        )
    }

    pub(super) async fn settle_fork(
        &self,
        all: &[SegInfo],
        cands: &[&SegInfo],
        at: u64,
        here: u64,
        headers: &mut HeaderCache,
        downloaded: &mut u64,
    ) -> Result<SegInfo, RestoreError> {
        let mut viable: Vec<(SegInfo, SegmentHeader)> = Vec::new();
        let mut first_err: Option<RestoreError> = None;
        for c in cands {
            let h = match headers.get(self, c, downloaded).await {
                Ok(h) => h,
                Err(e) => {
                    first_err.get_or_insert(e);
                    continue;
                }
            };
            if let Err(e) = self.enters(c, &h, at, here) {
                first_err.get_or_insert(e.into());
                continue;
            }
            viable.push(((*c).clone(), h));
        }
        match viable.len() {
            0 => Err(first_err.expect("every candidate was rejected for a reason")),
            1 => Ok(viable.remove(0).0),
            _ => {
                // Both continue the same state (a fork): the published one
                // is the one whose chain reaches the head's checksum. Prefer
                // the highest epoch among those that do.
                viable.sort_by_key(|v| std::cmp::Reverse(v.1.epoch));
                for (s, h) in &viable {
                    if self.reaches_head(all, s, h, headers, downloaded).await? {
                        return Ok(s.clone());
                    }
                }
                Err(RestoreError::NoPathToHead {
                    at,
                    keys: viable
                        .iter()
                        .map(|(s, _)| s.key.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    head: self.head.txid,
                    head_checksum: self.head.checksum,
                })
            }
        }
    }

    /// Several segments hold the txid after a snapshot that falls inside
    /// them (overlapping batches): their headers cannot show the checksum at
    /// the entry point, so keep those of the right epoch that lead to the head.
    pub(super) async fn settle_entry(
        &self,
        all: &[SegInfo],
        cands: &[&SegInfo],
        at: u64,
        headers: &mut HeaderCache,
        downloaded: &mut u64,
    ) -> Result<SegInfo, RestoreError> {
        let mut viable = Vec::new();
        for c in cands {
            if let Ok(h) = headers.get(self, c, downloaded).await {
                // Entered part-way: the epoch is what can be checked.
                if self.enters(c, &h, at, 0).is_ok() {
                    viable.push(((*c).clone(), h));
                }
            }
        }
        viable.sort_by_key(|v| std::cmp::Reverse(v.1.epoch));
        for (s, h) in &viable {
            if self.reaches_head(all, s, h, headers, downloaded).await? {
                return Ok(s.clone());
            }
        }
        Err(RestoreError::NoPathToHead {
            at,
            keys: cands
                .iter()
                .map(|s| s.key.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            head: self.head.txid,
            head_checksum: self.head.checksum,
        })
    }

    /// Whether a chain of segment headers leads from `s` to the manifest's
    /// head txid and checksum.
    pub(super) async fn reaches_head(
        &self,
        all: &[SegInfo],
        s: &SegInfo,
        h: &SegmentHeader,
        headers: &mut HeaderCache,
        downloaded: &mut u64,
    ) -> Result<bool, RestoreError> {
        let mut stack = vec![(s.clone(), h.clone())];
        let mut seen = std::collections::HashSet::new();
        while let Some((s, h)) = stack.pop() {
            if !seen.insert(s.key.clone()) {
                continue;
            }
            if s.to == self.head.txid {
                if h.post_checksum == self.head.checksum {
                    return Ok(true);
                }
                continue;
            }
            for n in all.iter().filter(|n| n.from == s.to + 1) {
                // A damaged header is simply not a way forward here.
                let Ok(nh) = headers.get(self, n, downloaded).await else {
                    continue;
                };
                if self.enters(n, &nh, s.to, h.post_checksum).is_ok() {
                    stack.push((n.clone(), nh));
                }
            }
        }
        Ok(false)
    }

    /// Downloads the snapshot in chunks and writes its image to `output`,
    /// verifying what [`SnapshotReader::restore_to`] verifies: header, index,
    /// object length, every frame, the whole-database checksum, the
    /// whole-file CRC.
    pub(super) async fn stream_snapshot(
        &self,
        snap: &ChosenSnapshot,
        mut output: Output,
        bar: &Progress,
        downloaded: &mut u64,
    ) -> Result<Output, RestoreError> {
        let key = snap.key.as_str();
        let corrupt = |source| RestoreError::Corrupt {
            key: key.to_string(),
            what: "snapshot",
            source,
        };
        let h = snap.header.clone();
        let suffix_len = h.index_suffix_len();
        let min_len = u64::from(h.header_len) + suffix_len;
        if snap.size < min_len {
            return Err(corrupt(CodecError::Truncated {
                what: "snapshot",
                needed: min_len,
                available: snap.size,
            }));
        }
        let suffix = self
            .get_range(key, snap.size - suffix_len, suffix_len, downloaded)
            .await?;
        let reader = SnapshotReader::new(h.clone(), &suffix).map_err(corrupt)?;
        if reader.object_len() != snap.size {
            return Err(corrupt(CodecError::LengthMismatch {
                expected: reader.object_len(),
                actual: snap.size,
            }));
        }
        let mut sink = SnapshotSink {
            suffix,
            reader,
            next_frame: 0,
            buf: Vec::new(),
            buf_start: 0,
            crc: crc32fast::Hasher::new(),
            size: snap.size,
        };
        let mut pos = 0u64;
        let mut first = Some(snap.prefix.clone());
        while pos < snap.size {
            let want = (snap.size - pos).min(CHUNK);
            let chunk = match first.take() {
                // The header prefix is the object's start: reuse it.
                Some(p) if !p.is_empty() => p,
                _ => self.get_range(key, pos, want, downloaded).await?,
            };
            if chunk.is_empty() {
                return Err(corrupt(CodecError::Truncated {
                    what: "snapshot",
                    needed: snap.size,
                    available: pos,
                }));
            }
            pos += chunk.len() as u64;
            bar.inc(chunk.len() as u64);
            let (o, s, r) = blocking(move || {
                let mut output = output;
                let mut sink = sink;
                let r = sink.feed(&mut output, &chunk);
                (output, sink, r)
            })
            .await?;
            output = o;
            sink = s;
            r.map_err(|e| self.snapshot_error(key, e))?;
        }
        let (o, r) = blocking(move || {
            let r = sink.finish(&output);
            (output, r)
        })
        .await?;
        r.map_err(|e| self.snapshot_error(key, e))?;
        Ok(o)
    }

    pub(super) fn snapshot_error(&self, key: &str, e: SinkError) -> RestoreError {
        match e {
            SinkError::Codec(source) => RestoreError::Corrupt {
                key: key.to_string(),
                what: "snapshot",
                source,
            },
            SinkError::Io(e) => e,
        }
    }
}

/// Segment headers fetched by range reads while settling forks.
#[derive(Default)]
pub(super) struct HeaderCache {
    pub(super) map: std::collections::HashMap<String, SegmentHeader>,
}

impl HeaderCache {
    pub(super) async fn get(
        &mut self,
        ctx: &Ctx<'_>,
        s: &SegInfo,
        downloaded: &mut u64,
    ) -> Result<SegmentHeader, RestoreError> {
        if let Some(h) = self.map.get(&s.key) {
            return Ok(h.clone());
        }
        let want = s.size.min(SEGMENT_MAX_HEADER_LEN as u64);
        if want == 0 {
            return Err(RestoreError::Corrupt {
                key: s.key.clone(),
                what: "segment",
                source: CodecError::Truncated {
                    what: "segment header",
                    needed: 12,
                    available: 0,
                },
            });
        }
        let b = ctx.get_range(&s.key, 0, want, downloaded).await?;
        let h = codec::parse_segment_header(&b).map_err(|source| RestoreError::Corrupt {
            key: s.key.clone(),
            what: "segment",
            source,
        })?;
        check_segment_key(s, &h, ctx.db, ctx.head.page_size)?;
        self.map.insert(s.key.clone(), h.clone());
        Ok(h)
    }
}

/// A segment's header must agree with its key and with the database.
pub(super) fn check_segment_key(
    s: &SegInfo,
    h: &SegmentHeader,
    db: &str,
    page_size: u32,
) -> Result<(), RestoreError> {
    let why = if h.db_name != db {
        format!("segment of database {:?}, expected {db:?}", h.db_name)
    } else if (h.txid_from, h.txid_to) != (s.from, s.to) {
        format!(
            "segment header says txids {}..={}, its key says {}..={}",
            h.txid_from, h.txid_to, s.from, s.to
        )
    } else if h.page_size != page_size {
        format!(
            "segment page size {} differs from the database's {page_size}",
            h.page_size
        )
    } else {
        return Ok(());
    };
    Err(RestoreError::Mismatch {
        key: s.key.clone(),
        why,
    })
}
