//! The passthrough decision and the I/O the daemon itself served: counters
//! the filesystem bumps and `status.json` (`io`) shows (docs/ARCHITECTURE.md,
//! "Passthrough"). A leaf: the filesystem depends on it, not the reverse.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// Whether this mount uses kernel passthrough, decided at mount.
const PENDING: u8 = 0;
const ON: u8 = 1;
const OFF: u8 = 2;

/// Path classes, as indices of the per-class counters (the order of
/// `fs::iomode::class_index`).
pub const CLASSES: [&str; 4] = [
    "local",
    "replicated-database",
    "database-sidecar",
    "replicated-file",
];

/// The passthrough decision and the I/O the daemon itself served, shared
/// between the filesystem and `status.json` (`io`).
#[derive(Default)]
pub struct IoStats {
    mode: AtomicU8,
    reason: Mutex<Option<String>>,
    kernel_opens: AtomicU64,
    daemon_opens: AtomicU64,
    reads: [AtomicU64; 4],
    writes: [AtomicU64; 4],
    durability: Mutex<String>,
    databases: Mutex<std::collections::BTreeMap<String, String>>,
}

/// `io` in status.json.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct IoDoc {
    /// "on", "off" or "pending" (before the mount's handshake).
    pub passthrough: String,
    /// Why passthrough is off, when it is.
    pub passthrough_off_reason: Option<String>,
    /// Opens served by the kernel from the backing file (reads and writes
    /// of those never reach the daemon).
    pub kernel_opens: u64,
    /// Opens whose reads and writes go through the daemon.
    pub daemon_opens: u64,
    /// READ requests the daemon served, per path class.
    pub daemon_reads: std::collections::BTreeMap<String, u64>,
    /// WRITE requests the daemon served, per path class.
    pub daemon_writes: std::collections::BTreeMap<String, u64>,
    /// When a commit is acknowledged: "local" (on this disk, shipped
    /// within about a second) or "bucket" (once in the bucket).
    #[serde(default)]
    pub durability: String,
    /// How each replicated database is served: "kernel" (passthrough,
    /// commits tailed from the WAL), "daemon", or a state in between.
    #[serde(default)]
    pub databases: std::collections::BTreeMap<String, String>,
}

impl IoStats {
    pub fn enabled(&self) -> bool {
        self.mode.load(Ordering::Acquire) == ON
    }

    /// Passthrough is usable: the kernel agreed at INIT and a backing file
    /// could be registered.
    pub fn set_on(&self) {
        if self.mode.load(Ordering::Acquire) != OFF {
            self.mode.store(ON, Ordering::Release);
        }
    }

    /// Today's path for every open, for the rest of the mount.
    pub fn set_off(&self, reason: &str) {
        let was = self.mode.swap(OFF, Ordering::AcqRel);
        let mut r = self.reason.lock().unwrap();
        if was != OFF || r.is_none() {
            tracing::warn!(
                reason,
                "kernel passthrough off: reads and writes go through the daemon"
            );
            *r = Some(reason.to_string());
        }
    }

    pub fn set_durability(&self, d: &str) {
        *self.durability.lock().unwrap() = d.to_string();
    }

    pub fn set_database(&self, db: &str, mode: &str) {
        self.databases
            .lock()
            .unwrap()
            .insert(db.to_string(), mode.to_string());
    }

    /// A READ the daemon served, of the path class numbered `class`
    /// (`fs::iomode::class_index`).
    pub fn read(&self, class: usize) {
        self.reads[class].fetch_add(1, Ordering::Relaxed);
    }

    /// A WRITE the daemon served (as [`IoStats::read`]).
    pub fn wrote(&self, class: usize) {
        self.writes[class].fetch_add(1, Ordering::Relaxed);
    }

    pub fn kernel_opened(&self) {
        self.kernel_opens.fetch_add(1, Ordering::Relaxed);
    }

    pub fn daemon_opened(&self) {
        self.daemon_opens.fetch_add(1, Ordering::Relaxed);
    }

    /// Turned off at mount (`MEMBRIDGE_PASSTHROUGH=off`) or since.
    pub fn is_off(&self) -> bool {
        self.mode.load(Ordering::Acquire) == OFF
    }

    pub fn doc(&self) -> IoDoc {
        let per_class = |a: &[AtomicU64; 4]| {
            CLASSES
                .iter()
                .zip(a)
                .map(|(n, c)| (n.to_string(), c.load(Ordering::Relaxed)))
                .collect()
        };
        IoDoc {
            passthrough: match self.mode.load(Ordering::Acquire) {
                ON => "on",
                OFF => "off",
                PENDING => "pending",
                _ => "unknown",
            }
            .into(),
            passthrough_off_reason: self.reason.lock().unwrap().clone(),
            kernel_opens: self.kernel_opens.load(Ordering::Relaxed),
            daemon_opens: self.daemon_opens.load(Ordering::Relaxed),
            daemon_reads: per_class(&self.reads),
            daemon_writes: per_class(&self.writes),
            durability: self.durability.lock().unwrap().clone(),
            databases: self.databases.lock().unwrap().clone(),
        }
    }
}
