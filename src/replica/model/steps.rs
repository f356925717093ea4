//! The model's steps and the strategies that draw random sequences of them.

use super::*;

// ─────────────────────────────────────────────────────────────────────────────
// Steps
// ─────────────────────────────────────────────────────────────────────────────

/// An object class of the bucket, to aim a fault at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Obj {
    Manifest,
    Segment,
    Snapshot,
    Lease,
}

impl Obj {
    pub(super) fn pattern(self) -> &'static str {
        match self {
            Obj::Manifest => "*manifest.json",
            Obj::Segment => "*/seg/*",
            Obj::Snapshot => "*/snap/*",
            Obj::Lease => "*leadership/lease.json",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// The next put of this class is stored, its answer lost.
    Lost(Obj),
    /// The next put of this class fails (the bucket did not answer).
    Fail(Obj),
    /// Nothing reaches the bucket from this node until healed.
    Outage,
}

/// One step of a sequence. Node numbers are taken modulo the node count (so
/// shrinking the count keeps a sequence meaningful); for the client's steps
/// and uploads, modulo the nodes that act as primary (a deposed primary may
/// not know it yet): a step with no such node does nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// A transaction inserting `rows` rows on a primary.
    Commit {
        node: u8,
        rows: u8,
    },
    /// As Commit, but the daemon dies once the writes reached the file and
    /// before capture saw them (kill -9 right after).
    CrashMidCommit {
        node: u8,
        rows: u8,
    },
    /// The primary's client checkpoints (TRUNCATE) through the daemon.
    Checkpoint {
        node: u8,
    },
    /// The primary's client closes its connection (checkpoint, `-wal` gone).
    CloseClient {
        node: u8,
    },
    /// One upload round.
    Upload {
        node: u8,
    },
    /// One lease keeper step and the role rules.
    Tick {
        node: u8,
    },
    /// One follower step (secondaries and catching-up nodes).
    Follow {
        node: u8,
    },
    /// Time passes beyond the lease: it expires in the bucket and its
    /// holder's deadline passes.
    Expire,
    /// The lease holder hands over to this node (flush, publish, pass).
    HandOver {
        to: u8,
    },
    /// The lease holder releases the lease on purpose.
    Release,
    /// kill -9: in-memory state gone, files and state dir kept.
    Kill {
        node: u8,
    },
    /// Start a killed node as the daemon does (recovery, divergent check,
    /// a first keeper step).
    Start {
        node: u8,
    },
    Fault {
        node: u8,
        fault: FaultKind,
    },
    Heal {
        node: u8,
    },
    /// Restore at a published txid (`pick` modulo the published range).
    Restore {
        pick: u16,
    },
    /// The tailer reads what the kernel-served client committed.
    Tail {
        node: u8,
    },
}

#[derive(Debug, Clone)]
pub struct Case {
    pub nodes: u8,
    pub steps: Vec<Step>,
    /// Primaries' databases served by the kernel and tailed.
    pub tailing: bool,
}

pub(super) fn obj() -> impl Strategy<Value = Obj> {
    prop_oneof![
        Just(Obj::Manifest),
        Just(Obj::Segment),
        Just(Obj::Snapshot),
        Just(Obj::Lease)
    ]
}

pub(super) fn step() -> impl Strategy<Value = Step> {
    let n = || 0u8..3;
    prop_oneof![
        20 => (n(), 1u8..4).prop_map(|(node, rows)| Step::Commit { node, rows }),
        3 => (n(), 1u8..4).prop_map(|(node, rows)| Step::CrashMidCommit { node, rows }),
        2 => n().prop_map(|node| Step::Checkpoint { node }),
        2 => n().prop_map(|node| Step::CloseClient { node }),
        16 => n().prop_map(|node| Step::Upload { node }),
        12 => n().prop_map(|node| Step::Tick { node }),
        8 => n().prop_map(|node| Step::Follow { node }),
        6 => Just(Step::Expire),
        4 => n().prop_map(|to| Step::HandOver { to }),
        2 => Just(Step::Release),
        6 => n().prop_map(|node| Step::Kill { node }),
        6 => n().prop_map(|node| Step::Start { node }),
        4 => (n(), obj()).prop_map(|(node, o)| Step::Fault { node, fault: FaultKind::Lost(o) }),
        3 => (n(), obj()).prop_map(|(node, o)| Step::Fault { node, fault: FaultKind::Fail(o) }),
        2 => n().prop_map(|node| Step::Fault { node, fault: FaultKind::Outage }),
        3 => n().prop_map(|node| Step::Heal { node }),
        3 => any::<u16>().prop_map(|pick| Step::Restore { pick }),
        8 => n().prop_map(|node| Step::Tail { node }),
    ]
}

pub(super) fn case(max_steps: usize) -> impl Strategy<Value = Case> {
    (
        2u8..=3,
        any::<bool>(),
        prop::collection::vec(step(), 1..=max_steps),
    )
        .prop_map(|(nodes, tailing, steps)| Case {
            nodes,
            steps,
            tailing,
        })
}
