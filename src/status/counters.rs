//! The daemon's counters, kept with atomics where the work happens: capture
//! ([`Metrics::txns_captured`]), the follower ([`Metrics::txns_applied`],
//! [`Metrics::bootstrap`]), the uploader ([`Metrics::uploaded`],
//! [`Metrics::upload_failure`]) and the read-through cache
//! ([`Metrics::read_through_fetch`], [`Metrics::cache_hit`]). They are read,
//! never rendered, here: [`crate::metrics`] renders them.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

/// A counter per label set (pre-rendered `k="v",...`, sorted by key).
#[derive(Default)]
pub(crate) struct Family(RwLock<BTreeMap<String, AtomicU64>>);

impl Family {
    fn add(&self, labels: &[(&str, &str)], n: u64) {
        let key = render_labels(labels);
        if let Some(c) = self.0.read().unwrap().get(&key) {
            c.fetch_add(n, Ordering::Relaxed);
            return;
        }
        self.0
            .write()
            .unwrap()
            .entry(key)
            .or_default()
            .fetch_add(n, Ordering::Relaxed);
    }

    fn get(&self, labels: &[(&str, &str)]) -> u64 {
        self.0
            .read()
            .unwrap()
            .get(&render_labels(labels))
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    pub(crate) fn samples(&self) -> Vec<(String, u64)> {
        self.0
            .read()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.load(Ordering::Relaxed)))
            .collect()
    }
}

/// What an upload carried: a segment of transactions or a full snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Object {
    Segment,
    Snapshot,
}

impl Object {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Object::Segment => "segment",
            Object::Snapshot => "snapshot",
        }
    }
}

/// The daemon's counters. Cheap to bump from any thread.
#[derive(Default)]
pub struct Metrics {
    pub(crate) captured: Family,
    pub(crate) applied: Family,
    pub(crate) bootstraps: Family,
    pub(crate) upload_bytes: Family,
    pub(crate) uploads: Family,
    pub(crate) upload_failures: Family,
    pub(crate) read_through_fetches: AtomicU64,
    pub(crate) cache_hits: AtomicU64,
}

impl Metrics {
    /// The primary journaled `n` committed transactions of `db`.
    pub fn txns_captured(&self, db: &str, n: u64) {
        self.captured.add(&[("db", db)], n);
    }

    /// A secondary applied `n` transactions of `db` from the bucket.
    pub fn txns_applied(&self, db: &str, n: u64) {
        self.applied.add(&[("db", db)], n);
    }

    /// A secondary rebuilt `db` from the bucket's snapshot (and segments).
    pub fn bootstrap(&self, db: &str) {
        self.bootstraps.add(&[("db", db)], 1);
    }

    /// An object of `db` of `bytes` bytes was stored in the bucket.
    pub fn uploaded(&self, db: &str, object: Object, bytes: u64) {
        let labels = [("db", db), ("object", object.name())];
        self.upload_bytes.add(&labels, bytes);
        self.uploads.add(&labels, 1);
    }

    /// An upload round failed (it is retried); `unreachable`: the bucket did
    /// not answer, as opposed to refusing or conflicting.
    pub fn upload_failure(&self, unreachable: bool) {
        let reason = if unreachable { "unreachable" } else { "error" };
        self.upload_failures.add(&[("reason", reason)], 1);
    }

    /// The read-through cache fetched a page (range) from the bucket.
    pub fn read_through_fetch(&self) {
        self.read_through_fetches.fetch_add(1, Ordering::Relaxed);
    }

    /// A read was served from the read-through page cache.
    pub fn cache_hit(&self) {
        self.cache_hits.fetch_add(1, Ordering::Relaxed);
    }

    pub fn captured_total(&self, db: &str) -> u64 {
        self.captured.get(&[("db", db)])
    }

    pub fn applied_total(&self, db: &str) -> u64 {
        self.applied.get(&[("db", db)])
    }
}

/// A label set as its key and as the exposition writes it: `k="v",...`.
pub(crate) fn render_labels(labels: &[(&str, &str)]) -> String {
    let mut s = String::new();
    for (i, (k, v)) in labels.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        let _ = write!(s, "{k}=\"{}\"", escape_label(v));
    }
    s
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
