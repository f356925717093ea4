//! Capture's reconciliations with what is on disk and in the bucket: at
//! mount (or first sight) the files with the journal, a new generation when
//! they disagree, the bucket's head adopted at promotion, and a fencing's
//! set-aside.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use super::*;

impl Capture {
    /// Reconcile `db`'s backing files with the journal before the mount serves
    /// anything: capture committed WAL frames the journal lacks, or start a new
    /// generation (a fresh base image, logged) when the two cannot be reconciled.
    /// Must run while nothing else writes the database (before mounting).
    pub fn recover(&self, db: &str) -> Result<()> {
        let io = Self::io(db);
        let Some(main) = self.open(db).map_err(&io)? else {
            return Ok(()); // no database (yet): nothing to reconcile
        };
        let wal_file = self.open(&format!("{db}-wal")).map_err(&io)?;
        let mut tracker = WalTracker::new();
        let wal_txns = match &wal_file {
            Some(f) => tracker.scan(f).map_err(&io)?,
            None => Vec::new(),
        };
        let mut head_buf = [0u8; 100];
        let n = main.read_at(&mut head_buf, 0).map_err(&io)?;
        let header = DbHeader::parse(&head_buf[..n]).ok();
        let page_size = match (wal_txns.first(), &header) {
            (Some(t), _) => t.page_size,
            (None, Some(h)) => h.page_size,
            (None, None) if n == 0 => return Ok(()), // empty file: SQLite has not written it
            (None, None) => {
                return Err(CaptureError::Inconsistent {
                    db: db.into(),
                    why: "not a SQLite database (bad header); refusing to replicate it".into(),
                })
            }
        };
        let file_len = main.metadata().map_err(&io)?.len();
        let mut hashes = PageHashes::from_reader(&main, page_size).map_err(&io)?;
        let main_size = match &header {
            Some(h) if h.size_is_valid() && h.size_in_pages > 0 => h.size_in_pages,
            _ => (file_len / page_size as u64) as u32,
        };
        hashes
            .apply(std::iter::empty(), main_size)
            .map_err(|e| inconsistent(db, e))?;
        let journal_head = self.journal.head(db)?;
        // The journal holds the state after some prefix of the WAL's committed
        // transactions (all of them, normally). Find the last prefix whose state
        // has the journal head's checksum: what follows it reached the file but
        // not the journal (a crash between the two) and is captured now.
        let mut captured = None;
        if let Some(h) = journal_head.as_ref().filter(|h| h.page_size == page_size) {
            let mut probe = hashes.clone();
            if probe.checksum() == h.head_checksum {
                captured = Some(0);
            }
            for (i, t) in wal_txns.iter().enumerate() {
                apply_wal(&mut probe, t).map_err(|e| inconsistent(db, e))?;
                if probe.checksum() == h.head_checksum {
                    captured = Some(i + 1);
                }
            }
        }
        let done = captured.unwrap_or(wal_txns.len());
        for t in &wal_txns[..done] {
            apply_wal(&mut hashes, t).map_err(|e| inconsistent(db, e))?;
        }
        let mut state = DbCapture {
            name: db.to_string(),
            head: journal_head
                .clone()
                .unwrap_or_else(|| empty_head(db, page_size)),
            hashes,
            tracker,
            wal: wal_file,
            detector: CommitDetector::new(false),
            dirty: Vec::new(),
            unjournaled: false,
        };
        if captured.is_some() {
            let missing = &wal_txns[done..];
            if !missing.is_empty() {
                tracing::warn!(
                    db,
                    count = missing.len(),
                    "capturing committed WAL transactions the journal lacked"
                );
            }
            for t in missing {
                self.commit(&mut state, wal_pages(t), t.db_size_pages)?;
            }
        } else {
            self.new_generation(&mut state, &main, &wal_txns, journal_head.as_ref())?;
        }
        self.publish(db, &state);
        self.dbs
            .lock()
            .unwrap()
            .insert(db.to_string(), Arc::new(Mutex::new(state)));
        Ok(())
    }

    /// Start history over from the database as it is now: a base image of the
    /// current logical state (main file + committed WAL frames), at a txid past
    /// anything used before, so txids are never reused.
    pub(super) fn new_generation(
        &self,
        st: &mut DbCapture,
        main: &File,
        wal_txns: &[WalTxn],
        old: Option<&DbHead>,
    ) -> Result<()> {
        let db = st.name.clone();
        let io = Self::io(&db);
        let page_size = st.hashes.page_size();
        let size = st.hashes.page_count();
        let (generation, txid) = match old {
            Some(h) => (h.generation + 1, h.head_txid + 1),
            None => (1, 0),
        };
        std::fs::create_dir_all(&self.base_dir).map_err(&io)?;
        let path = base_path(&self.base_dir, &db, txid);
        let tmp = path.with_extension("tmp");
        {
            let out = File::create(&tmp).map_err(&io)?;
            let mut buf = vec![0u8; page_size as usize];
            for pgno in 1..=size {
                buf.fill(0);
                main.read_at(&mut buf, (pgno as u64 - 1) * page_size as u64)
                    .map_err(&io)?;
                out.write_all_at(&buf, (pgno as u64 - 1) * page_size as u64)
                    .map_err(&io)?;
            }
            for t in wal_txns {
                for (pgno, page) in &t.pages {
                    if *pgno <= size {
                        out.write_all_at(page, (*pgno as u64 - 1) * page_size as u64)
                            .map_err(&io)?;
                    }
                }
            }
            out.set_len(size as u64 * page_size as u64).map_err(&io)?;
            out.sync_all().map_err(&io)?;
        }
        let check = PageHashes::from_file(&tmp, page_size).map_err(&io)?;
        if check.checksum() != st.hashes.checksum() {
            return Err(inconsistent(
                &db,
                "base image does not match the database it was read from",
            ));
        }
        std::fs::rename(&tmp, &path).map_err(&io)?;
        if let Some(h) = old {
            tracing::warn!(
                db = %db, old_generation = h.generation, generation, txid,
                "the database and the local journal disagree (changed outside membridge?): starting a new generation from a fresh snapshot"
            );
        } else {
            tracing::info!(db = %db, txid, "first capture of this database: base snapshot taken");
        }
        let head = DbHead {
            name: db.clone(),
            page_size,
            generation,
            head_txid: txid,
            head_checksum: st.hashes.checksum(),
            size_pages: size,
            uploaded_txid: 0,
            base_txid: txid,
        };
        self.journal.start_generation(&head)?;
        if let Some(h) = old {
            self.journal.set_parent(&db, h.head_checksum)?;
        }
        st.head = head;
        self.wake.notify_one();
        Ok(())
    }

    /// Promotion: the local file holds exactly the bucket's head (the
    /// follower's verified copy). Make it the start of this node's history,
    /// with a base image for later snapshots. `Ok(false)` if it does not match.
    pub fn adopt(&self, db: &str, d: &crate::replica::manifest::DbManifest) -> Result<bool> {
        let io = Self::io(db);
        let Some(main) = self.open(db).map_err(&io)? else {
            return Ok(false);
        };
        let wal_len = std::fs::metadata(self.backing(&format!("{db}-wal"))).map(|m| m.len());
        if let Some(n) = wal_len.ok().filter(|n| *n > 0) {
            tracing::info!(db, wal_bytes = n, "not adopting: the -wal holds frames");
            return Ok(false); // frames the bucket does not have: not the head
        }
        let mut hashes = PageHashes::from_reader(&main, d.page_size).map_err(&io)?;
        hashes
            .apply(std::iter::empty(), d.size_pages)
            .map_err(|e| inconsistent(db, e))?;
        if Some(hashes.checksum()) != crate::replica::manifest::parse_hex64(&d.head_checksum) {
            tracing::info!(
                db,
                local = format!("{:016x}", hashes.checksum()),
                head = %d.head_checksum,
                "not adopting: the local file is not the bucket's head"
            );
            return Ok(false);
        }
        std::fs::create_dir_all(&self.base_dir).map_err(&io)?;
        let base = base_path(&self.base_dir, db, d.head_txid);
        let tmp = base.with_extension("tmp");
        std::fs::copy(self.backing(db), &tmp).map_err(&io)?;
        std::fs::OpenOptions::new()
            .write(true)
            .open(&tmp)
            .and_then(|f| f.set_len(d.size_pages as u64 * d.page_size as u64))
            .map_err(&io)?;
        std::fs::rename(&tmp, &base).map_err(&io)?;
        let head = DbHead {
            name: db.to_string(),
            page_size: d.page_size,
            generation: d.generation,
            head_txid: d.head_txid,
            head_checksum: hashes.checksum(),
            size_pages: d.size_pages,
            uploaded_txid: d.head_txid,
            base_txid: d.head_txid,
        };
        self.journal.start_generation(&head)?;
        let state = DbCapture {
            name: db.to_string(),
            head,
            hashes,
            tracker: WalTracker::new(),
            wal: None,
            detector: CommitDetector::new(false),
            dirty: Vec::new(),
            unjournaled: false,
        };
        self.publish(db, &state);
        self.dbs
            .lock()
            .unwrap()
            .insert(db.to_string(), Arc::new(Mutex::new(state)));
        tracing::info!(
            db,
            txid = d.head_txid,
            "adopted the bucket's head as this node's history"
        );
        Ok(true)
    }

    /// Fencing: this node lost the lease with transactions the bucket never
    /// got. Each such database is written out as it stood locally with a
    /// report, under `divergent/` in the state dir (see
    /// [`crate::replica::divergent`]), and capture forgets it, so the follower can
    /// bring the bucket's history back.
    pub fn set_aside(&self, node: &str, reason: &str) -> Vec<PathBuf> {
        let dir = self.base_dir.with_file_name("divergent");
        let heads = self.journal.heads().unwrap_or_default();
        let out = heads
            .iter()
            .filter(|h| {
                let aside = self.journal.divergent_through(&h.name).ok().flatten();
                h.head_txid > h.uploaded_txid.max(aside.unwrap_or(0))
            })
            .map(|h| {
                crate::replica::divergent::set_aside(
                    &self.journal,
                    &self.base_dir,
                    &dir,
                    h,
                    node,
                    None,
                    reason,
                )
            })
            .collect();
        self.dbs.lock().unwrap().clear();
        out
    }
}
