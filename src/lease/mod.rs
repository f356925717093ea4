//! The leadership lease (docs/ARCHITECTURE.md §3): who is primary, under which epoch, until when.
//!
//! `projects/<cid>/leadership/lease.json` keeps the old hook-based tool's fields
//! so that both tools can read it during a migration, but membridge changes it
//! only by conditional writes: created with `If-None-Match: *`, and renewed,
//! taken, released or handed over with `If-Match: <etag>`. Of several nodes
//! racing for it exactly one wins; a node whose conditional write fails has lost
//! the lease, and that is the fencing signal the daemon acts on.
//!
//! - [`Lease`]: the object, parsed strictly (a malformed lease or one of another
//!   project is a typed error and is never overwritten) and written back with
//!   every field it had, including fields only an old tool knows.
//! - [`LeaseClient`]: one node's operations on it, each one conditional write
//!   plus an audit entry under `leadership/audit/`.
//! - [`LeaseKeeper`]: the task the daemon runs: takes the lease when the policy
//!   allows, renews it every TTL/3, watches `handover.json` (every 0.5 s while
//!   holding, so a hand-over starts at once), and reports [`LeaseState`] on a
//!   watch channel.
//! - Hand-over: [`LeaseClient::request_handover`] (`select`) and
//!   [`LeaseClient::request_follow`] (policy `follow`, which the primary may
//!   decline while busy) write `handover.json`; [`LeaseClient::wait_taken_over`]
//!   waits until the target takes writes.
//! - Heartbeats: [`Heartbeat`] under `nodes/<node_id>.json`, [`list_nodes`].
//! - What `membridge leadership info` and `membridge nodes` print: in
//!   [`crate::cli::lease`], above this module.
//!
//! # Time
//!
//! `issued_at` and `expires_at` are written as whole Unix seconds, as the old
//! tool writes them (`int(time.time())`); both integer or fractional seconds and
//! RFC 3339 strings are accepted when reading. Written times are rounded up, so
//! a holder never gets less than `lease_seconds`.
//!
//! Clocks differ between machines, so the two sides of the lease read
//! `expires_at` with a margin ([`LeaseClient::skew_margin`]): the holder
//! considers its lease gone `skew_margin` *before* `expires_at`, every other
//! node considers it held until `skew_margin` *after*. As long as clocks differ
//! by less than the margin, the holder has stopped writing before anyone else
//! may take the lease. (The manifest's compare-and-swap fences a deposed primary
//! even if they do not.)
//!
//! # Epochs and sessions
//!
//! Every new tenure gets a new epoch: creating the lease is epoch 1; taking an
//! expired or released lease, `select` and a hand-over write `epoch + 1`.
//! Renewing and releasing keep the epoch. Because node ids default to host names
//! and two machines may share one, each [`LeaseClient`] also has a random
//! session id, stored in the lease as `membridge_session`: a node renews only a
//! lease that carries its own session, so two daemons with the same node id can
//! never both believe they hold the same epoch. A lease written *for* a node by
//! someone else (`select`, a hand-over) carries no session; the named node
//! adopts it at that epoch with its first renewal.
//!
//! # Audit
//!
//! Every change of holder, epoch or release writes one entry under
//! `leadership/audit/<utc>-<node>.json` with the new lease's fields (as the old
//! tool's entries have) plus `event`, `from`, `to`, `prev_epoch`, `reason`, `by`.
//! Routine renewals are not audited: one entry every TTL/3 per project would
//! bury the changes that matter under thousands of identical objects a day.
//!
//! # Files
//!
//! - `object.rs`: [`Lease`], [`Handover`] and the outcomes of the operations.
//! - `client.rs`: [`LeaseClient`]: reading, taking, renewing, releasing.
//! - `handover.rs`: its hand-over operations (`select`, requests, waits).
//! - `keeper.rs`: [`LeaseKeeper`] and [`LeaseState`].
//! - `leaser.rs`: [`Leaser`], what the roles module needs from a lease.
//! - `heartbeat.rs`: [`Heartbeat`], [`list_nodes`], [`HeartbeatTask`].
//! - `policy.rs`: [`Policy`] and [`LeaseSettings`], what a client is made from.
//! - `time.rs`: how times are read and written.
//!
//! The tunables below are shared by several of these files, so they live here.

use std::time::Duration;

mod client;
mod handover;
mod heartbeat;
mod keeper;
mod leaser;
mod object;
pub mod oldtool;
mod policy;
pub(crate) mod time;

pub use client::*;
pub use heartbeat::*;
pub use keeper::*;
pub use leaser::Leaser;
pub use object::*;
pub use policy::{LeaseSettings, Policy};
pub use time::parse_time;

/// Default interval between two heartbeats of a node.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);
/// A node is stale once its last heartbeat is older than this many intervals.
pub const STALE_AFTER_INTERVALS: u32 = 3;
/// How long past the TTL `select` waits for a hand-over, and for how long the
/// primary honours a `handover.json` request after it was written.
pub const HANDOVER_GRACE: Duration = Duration::from_secs(5);
/// How often the primary looks for a hand-over request (a conditional GET of
/// `handover.json`, a 304 or 404 when there is none): the first part of a
/// hand-over's latency, and two small requests a second when idle.
pub const HANDOVER_WATCH_PRIMARY: Duration = Duration::from_millis(500);
/// How often a node that may become primary looks for a request naming it, so
/// that it is watching the lease closely by the time the primary hands over
/// (a `select` run on a third machine, or on the primary's status page).
pub const HANDOVER_WATCH_SECONDARY: Duration = Duration::from_secs(1);
/// How often a node reads the lease while a hand-over to it is pending, and
/// `select` the lease and the manifest while it waits.
pub const HANDOVER_POLL: Duration = Duration::from_millis(100);

/// The lease field naming the holding daemon's session (see the module docs).
pub const SESSION_FIELD: &str = "membridge_session";
/// Set by a release: who released the lease, and when (Unix seconds).
pub const RELEASED_BY_FIELD: &str = "released_by";
pub const RELEASED_AT_FIELD: &str = "released_at";
/// Set by `migrate --rollback` on the lease it writes for the old tool: no
/// membridge node adopts it (the old tool drops it at its first renewal).
pub const ROLLBACK_FIELD: &str = "membridge_rollback";
