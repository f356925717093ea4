//! Read-through and hydration: a secondary serves a database before it is local.
//!
//! A fresh secondary does not download the database before answering. The
//! follower lays out the backing file at the head's size (sparse), writes the
//! pages changed since the latest snapshot (from the segments), and registers
//! a [`Hydration`]: every other page is still the snapshot's and is missing.
//! A read of a missing page fetches its snapshot frame with one range read
//! (kept in a bounded LRU of decoded frames) and writes the frame's missing
//! pages into the backing file before the read is served; meanwhile a
//! background task fetches the rest, frame run by frame run. The view
//! applier's checkpoints claim the pages they write under the same lock
//! before writing them, so a late snapshot page never overwrites a newer one. Once nothing is
//! missing, the follower hashes the whole file against the head's checksum.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use lru::LruCache;

use crate::journal::codec::SnapshotReader;
use crate::progress::Progress;
use crate::remote::{ObjectStore, StoreError};
use crate::status::{HydrationStatus, Status};

/// Frames fetched together by the background hydrator (one range read).
const HYDRATE_RUN_BYTES: u64 = 4 << 20;

/// Why frames could not be had: the bucket (retry) or the object (give up).
#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error(transparent)]
    Store(StoreError),
    #[error("{0}")]
    Corrupt(String),
}

/// A decoded snapshot frame: its pages, in order.
type Frame = Arc<Vec<Bytes>>;

/// One database being hydrated from one snapshot.
pub struct Hydration {
    id: u64,
    db: String,
    key: String,
    reader: SnapshotReader,
    file: std::fs::File,
    page_size: u64,
    pages: Mutex<Pages>,
    /// Set when the database was rebuilt again or the node stopped following.
    cancelled: AtomicBool,
    failed: Mutex<Option<String>>,
    started: Instant,
}

/// Which snapshot pages are not in the backing file yet.
struct Pages {
    /// Indexed by page number - 1, over the snapshot's pages.
    missing: Vec<bool>,
    left: u32,
}

impl Pages {
    fn mark(&mut self, pgno: u32) {
        if let Some(m) = self.missing.get_mut(pgno as usize - 1) {
            if std::mem::replace(m, false) {
                self.left -= 1;
            }
        }
    }

    fn is_missing(&self, pgno: u32) -> bool {
        self.missing
            .get(pgno as usize - 1)
            .copied()
            .unwrap_or(false)
    }
}

impl Hydration {
    fn frame_missing(&self, p: &Pages, frame: u32) -> bool {
        let g = u32::from(self.reader.header().pages_per_frame);
        let first = frame * g + 1;
        (first..first + g).any(|n| p.is_missing(n))
    }

    /// Writes the frame's pages that are still missing.
    fn fill(&self, frame: u32, pages: &[Bytes]) -> std::io::Result<()> {
        let g = u32::from(self.reader.header().pages_per_frame);
        let mut p = self.pages.lock().unwrap();
        for (i, page) in pages.iter().enumerate() {
            let pgno = frame * g + 1 + i as u32;
            if p.is_missing(pgno) {
                self.file
                    .write_all_at(page, (u64::from(pgno) - 1) * self.page_size)?;
                p.mark(pgno);
            }
        }
        Ok(())
    }

    fn progress(&self) -> HydrationStatus {
        let p = self.pages.lock().unwrap();
        let total = p.missing.len() as u64;
        HydrationStatus {
            pages_total: total,
            pages_local: total - u64::from(p.left),
            done: p.left == 0,
            verified: false,
            snapshot: self.key.clone(),
            error: self.failed.lock().unwrap().clone(),
        }
    }
}

/// What the follower learns about a database's hydration.
pub enum State {
    /// No hydration registered: the file is whole (or was never lazy).
    None,
    Running,
    Complete,
    Failed(String),
}

pub struct ReadThrough {
    store: Arc<dyn ObjectStore>,
    rt: tokio::runtime::Handle,
    status: Status,
    /// Decoded snapshot frames by (hydration id, frame number).
    cache: Mutex<LruCache<(u64, u32), Frame>>,
    cache_bytes: usize,
    dbs: RwLock<HashMap<String, Arc<Hydration>>>,
    /// Whether `dbs` holds anything (kept with it, under its write lock).
    any: AtomicBool,
    next_id: AtomicU64,
}

impl ReadThrough {
    pub fn new(
        store: Arc<dyn ObjectStore>,
        rt: tokio::runtime::Handle,
        status: Status,
        cache_bytes: usize,
    ) -> Arc<ReadThrough> {
        Arc::new(ReadThrough {
            store,
            rt,
            status,
            // Sized in frames once the first snapshot says how big they are.
            cache: Mutex::new(LruCache::new(NonZeroUsize::MIN)),
            cache_bytes,
            dbs: RwLock::new(HashMap::new()),
            any: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
        })
    }

    fn get(&self, db: &str) -> Option<Arc<Hydration>> {
        // Every read of a replicated database asks; almost always nothing
        // is hydrating, and that answer needs no lock.
        if !self.any.load(Ordering::Acquire) {
            return None;
        }
        self.dbs.read().unwrap().get(db).cloned()
    }

    /// Registers `db` as served from `reader`'s snapshot except for the
    /// pages already written (`present`), up to `size_pages`. Called with the
    /// database locked exclusively, after the backing file was laid out.
    pub fn install(
        &self,
        db: &str,
        key: &str,
        reader: SnapshotReader,
        file: std::fs::File,
        present: impl Iterator<Item = u32>,
        size_pages: u32,
    ) -> Arc<Hydration> {
        let h = reader.header();
        let snap_pages = h.page_count.min(size_pages);
        let mut pages = Pages {
            missing: vec![true; snap_pages as usize],
            left: snap_pages,
        };
        for p in present {
            pages.mark(p);
        }
        let frame_bytes = usize::from(h.pages_per_frame) * h.page_size as usize;
        let frames = (self.cache_bytes / frame_bytes.max(1)).max(4);
        {
            let mut c = self.cache.lock().unwrap();
            if c.cap().get() < frames {
                c.resize(NonZeroUsize::new(frames).expect("at least 4"));
            }
        }
        let hyd = Arc::new(Hydration {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            db: db.to_string(),
            key: key.to_string(),
            page_size: u64::from(h.page_size),
            reader,
            file,
            pages: Mutex::new(pages),
            cancelled: AtomicBool::new(false),
            failed: Mutex::new(None),
            started: Instant::now(),
        });
        let mut dbs = self.dbs.write().unwrap();
        if let Some(old) = dbs.insert(db.to_string(), hyd.clone()) {
            old.cancelled.store(true, Ordering::Release);
        }
        self.any.store(true, Ordering::Release);
        drop(dbs);
        self.publish(&hyd);
        hyd
    }

    /// Forgets `db`'s hydration (rebuilt whole, or verified).
    pub fn remove(&self, db: &str) {
        let mut dbs = self.dbs.write().unwrap();
        if let Some(old) = dbs.remove(db) {
            old.cancelled.store(true, Ordering::Release);
        }
        self.any.store(!dbs.is_empty(), Ordering::Release);
    }

    pub fn state(&self, db: &str) -> State {
        let Some(h) = self.get(db) else {
            return State::None;
        };
        if let Some(e) = h.failed.lock().unwrap().clone() {
            return State::Failed(e);
        }
        if h.pages.lock().unwrap().left == 0 {
            State::Complete
        } else {
            State::Running
        }
    }

    /// Whether every replicated database is whole locally.
    pub fn all_local(&self) -> bool {
        self.dbs
            .read()
            .unwrap()
            .values()
            .all(|h| h.pages.lock().unwrap().left == 0)
    }

    /// Marks the pages a write of `len` bytes at `offset` covers as present
    /// (`len == u64::MAX`: everything from `offset` on, a truncation), before
    /// the write happens: the hydrator then never lays an older snapshot
    /// page over them. The view applier's checkpoints write whole pages.
    pub fn claim(&self, db: &str, offset: u64, len: u64) {
        let Some(h) = self.get(db) else {
            return;
        };
        if len == 0 {
            return;
        }
        let mut p = h.pages.lock().unwrap();
        let first = offset / h.page_size + 1;
        let last = match len {
            u64::MAX => p.missing.len() as u64,
            _ => (offset + len - 1) / h.page_size + 1,
        };
        for pgno in first..=last.min(p.missing.len() as u64) {
            p.mark(pgno as u32);
        }
    }

    /// Makes `len` bytes at `offset` of `db` local before a read. Runs on a
    /// FUSE thread: blocks on the fetch. Errors are errnos for the reader.
    pub fn ensure(&self, db: &str, offset: u64, len: u32) -> Result<(), i32> {
        let Some(h) = self.get(db) else {
            return Ok(());
        };
        if len == 0 {
            return Ok(());
        }
        let g = u64::from(h.reader.header().pages_per_frame);
        let (first, last) = (
            offset / h.page_size,
            (offset + u64::from(len) - 1) / h.page_size,
        );
        let frames: Vec<u32> = {
            let p = h.pages.lock().unwrap();
            if p.left == 0 {
                return Ok(());
            }
            let max_frame = (p.missing.len() as u64).div_ceil(g);
            (first / g..=(last / g).min(max_frame.saturating_sub(1)))
                .map(|f| f as u32)
                .filter(|f| h.frame_missing(&p, *f))
                .collect()
        };
        let (Some(&lo), Some(&hi)) = (frames.first(), frames.last()) else {
            return Ok(());
        };
        let got = self
            .rt
            .block_on(self.frames(&h, lo, hi, true))
            .map_err(|e| e.to_string());
        match got.and_then(|fs| {
            fs.into_iter()
                .try_for_each(|(f, pages)| h.fill(f, &pages).map_err(|e| e.to_string()))
        }) {
            Ok(()) => {
                self.publish(&h);
                Ok(())
            }
            Err(e) => {
                tracing::error!(db, offset, len, error = %e, "read-through failed");
                self.status.update(|s| {
                    s.databases.entry(db.to_string()).or_default().last_error =
                        Some(format!("read-through: {e}"))
                });
                Err(libc::EIO)
            }
        }
    }

    /// Frames `lo..=hi`, from the cache or with one range read for the rest.
    async fn frames(
        &self,
        h: &Hydration,
        lo: u32,
        hi: u32,
        on_demand: bool,
    ) -> Result<Vec<(u32, Frame)>, FetchError> {
        let mut out = Vec::new();
        let mut want = Vec::new();
        {
            let mut c = self.cache.lock().unwrap();
            for f in lo..=hi {
                match c.get(&(h.id, f)) {
                    Some(pages) => out.push((f, pages.clone())),
                    None => want.push(f),
                }
            }
        }
        let hits = out.len() as u64;
        if let (Some(&a), Some(&b)) = (want.first(), want.last()) {
            let index = h.reader.index();
            let start = index[a as usize].offset;
            let end = index[b as usize].offset + u64::from(index[b as usize].len);
            let body = self
                .fetch_range(&h.key, start, end - start)
                .await
                .map_err(FetchError::Store)?;
            let mut c = self.cache.lock().unwrap();
            for f in a..=b {
                let e = index[f as usize];
                let s = (e.offset - start) as usize;
                let pages = h
                    .reader
                    .decode_frame(f, &body[s..s + e.len as usize])
                    .map_err(|e| FetchError::Corrupt(format!("{}: frame {f}: {e}", h.key)))?;
                let pages = Arc::new(pages);
                if on_demand {
                    c.put((h.id, f), pages.clone());
                }
                if want.contains(&f) {
                    out.push((f, pages));
                }
            }
        }
        if on_demand {
            let fetches = u64::from(!want.is_empty());
            let m = self.status.metrics();
            if fetches > 0 {
                m.read_through_fetch();
            }
            (0..hits).for_each(|_| m.cache_hit());
            self.status.update(|s| {
                let d = s.databases.entry(h.db.clone()).or_default();
                d.read_through_fetches += fetches;
                d.cache_hits += hits;
            });
        }
        Ok(out)
    }

    async fn fetch_range(&self, key: &str, start: u64, len: u64) -> Result<Bytes, StoreError> {
        let got = self.store.get_range(key, start, len).await?;
        if got.len() as u64 != len {
            return Err(StoreError::Other {
                op: "get",
                key: key.to_string(),
                detail: format!("range read returned {} bytes, asked for {len}", got.len()),
            });
        }
        Ok(got)
    }

    fn publish(&self, h: &Hydration) {
        let p = h.progress();
        self.status.update(|s| {
            s.databases.entry(h.db.clone()).or_default().hydration = Some(p);
        });
    }

    /// Fetches every missing frame in the background, in runs of a few MiB.
    pub async fn hydrate(self: Arc<Self>, h: Arc<Hydration>) {
        let frames = h.reader.header().frame_count();
        let index = h.reader.index().to_vec();
        let start = h.progress();
        // A bar when the daemon runs in the foreground on a terminal, a log
        // line per 10% otherwise.
        let bar = Progress::new(
            true,
            (start.pages_total - start.pages_local) * h.page_size,
            format!("hydrating {}", h.db),
        );
        let mut local = start.pages_local;
        let mut f = 0u32;
        while f < frames {
            if h.cancelled.load(Ordering::Acquire) {
                return;
            }
            // The next run: from the first frame still missing, up to a few MiB.
            let (lo, hi) = {
                let p = h.pages.lock().unwrap();
                while f < frames && !h.frame_missing(&p, f) {
                    f += 1;
                }
                if f == frames {
                    break;
                }
                let (lo, mut hi, mut bytes) = (f, f, u64::from(index[f as usize].len));
                while hi + 1 < frames && bytes < HYDRATE_RUN_BYTES {
                    hi += 1;
                    bytes += u64::from(index[hi as usize].len);
                }
                (lo, hi)
            };
            match self.frames(&h, lo, hi, false).await {
                Ok(got) => {
                    for (n, pages) in got {
                        if let Err(e) = h.fill(n, &pages) {
                            self.fail(&h, format!("writing the backing file: {e}"));
                            return;
                        }
                    }
                    f = hi + 1;
                }
                Err(FetchError::Corrupt(e)) => {
                    self.fail(&h, e);
                    return;
                }
                Err(FetchError::Store(e)) => {
                    tracing::warn!(db = %h.db, error = %e, "hydration: fetch failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            }
            let p = h.progress();
            bar.inc(p.pages_local.saturating_sub(local) * h.page_size);
            local = p.pages_local;
            self.publish(&h);
        }
        bar.finish();
        self.publish(&h);
        tracing::info!(
            db = %h.db,
            seconds = h.started.elapsed().as_secs_f64(),
            "hydrated: every page is local"
        );
    }

    fn fail(&self, h: &Hydration, why: String) {
        tracing::error!(db = %h.db, error = %why, "hydration failed");
        *h.failed.lock().unwrap() = Some(why);
        self.publish(h);
    }
}
