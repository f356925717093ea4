//! The invariants, checked after every step, and the final settling.

use super::*;

impl World<'_> {
    // ── invariants ──────────────────────────────────────────────────────────

    pub(super) fn manifest(&self) -> Option<(manifest::Versioned, manifest::DbManifest)> {
        let v = self
            .rt
            .block_on(manifest::load(self.mem.as_ref(), &self.layout, CID))
            .unwrap()?;
        let d = v.manifest.databases.get(DB)?.clone();
        Some((v, d))
    }

    /// Restore `target` from the bucket itself; the txid and image.
    pub(super) fn restore(&mut self, target: Target) -> Result<(u64, Image), String> {
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
    pub(super) fn matches_cand(&self, m: &manifest::Manifest, txid: u64, img: &Image) -> Check {
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

    pub(super) fn restore_pick(&mut self, pick: u16) -> Check {
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
    pub(super) fn with_journal<T>(&self, i: usize, f: impl FnOnce(&Journal) -> T) -> T {
        match &self.nodes[i].up {
            Some(up) => f(&up.journal),
            None => f(&Journal::open(&self.nodes[i].state.join("journal.db")).unwrap()),
        }
    }

    /// The image at the head of node `i`'s journal.
    pub(super) fn journal_image(&mut self, i: usize) -> Result<Option<Image>, String> {
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
    pub(super) fn report_images(&self, i: usize) -> Vec<Image> {
        divergent::reports(&self.nodes[i].state)
            .iter()
            .filter_map(|p| {
                let r: divergent::Report = serde_json::from_slice(&std::fs::read(p).ok()?).ok()?;
                ids_of(Path::new(r.copy.as_ref()?)).ok()
            })
            .collect()
    }

    /// The checksum of `h`'s history at `txid`, if the journal still knows it.
    pub(super) fn checksum_at(j: &Journal, h: &DbHead, txid: u64) -> Option<u64> {
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
    pub(super) fn check(&mut self) -> Check {
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
            // Still in the files only, not tailed yet (checked at the end).
            if self.nodes[a.node].pending.iter().any(|p| p.ids == a.ids) {
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
    pub(super) fn settle_all(&mut self) -> Check {
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
                self.sync_tails()?;
                self.upload(i)?;
                self.drop_stale_clients();
                self.sync_tails()?;
                self.follow(i)?;
                self.sync_tails()?;
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
        for s in &self.nodes {
            if let Some(p) = s.pending.first() {
                return Err(format!(
                    "{}'s commit {:?}, acknowledged on a database the kernel served, was never \
                     captured ({} such)",
                    s.name,
                    p.ids,
                    s.pending.len()
                ));
            }
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

    pub(super) fn converged(&self) -> bool {
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
