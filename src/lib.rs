//! membridge: a FUSE daemon that mounts in place over a directory of SQLite
//! databases and replicates them transaction by transaction through S3.
//!
//! The data path reads top to bottom: a write enters [`fs`], is classified and
//! passed through, is turned into a transaction by [`sqlite`], stored by
//! [`journal`], shipped by [`replica`] through [`remote`]. On a secondary the
//! same path runs backwards.
//!
//! Every `unsafe` block says why it is sound in a `// SAFETY:` comment;
//! clippy refuses one without.

#![deny(clippy::undocumented_unsafe_blocks)]

/// What the `membridge` subcommands print.
pub mod cli;
/// Living beside the old hook-based tool: its lease, its `sqlite/` copy.
pub mod coexist;
pub mod config;
pub mod daemon;
/// `membridge doctor`: bucket, lease, mount, databases, replication; a STATUS verdict.
pub mod doctor;
pub mod fs;
/// The small HTTP server of `--metrics-addr`: bounded, one request per connection.
pub mod http;
pub mod journal;
/// The leadership lease: conditional writes, renewal, fencing, heartbeats.
pub mod lease;
/// `manifest.json`: the bucket's head per database, changed by compare-and-swap.
pub mod manifest;
/// `membridge merge`: import another claude-mem database's rows by natural key.
pub mod merge;
/// The Prometheus text exposition of the status and its counters, at `/metrics`.
pub mod metrics;
/// `membridge migrate`: adopt a bucket written by the old hook-based tool.
pub mod migrate;
/// The status page at `/` of `--metrics-addr`, its JSON state and its actions.
pub mod page;
/// Progress of long work: a bar on a terminal, log lines elsewhere.
pub mod progress;
pub mod remote;
pub mod replica;
/// `status.json`, the `primary` file and `membridge status`: the status shown.
pub mod report;
pub mod sqlite;
/// The daemon's live state and counters (a leaf: rendering is above it).
pub mod status;
