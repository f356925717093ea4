//! Replication: the primary's capture and uploader, the secondary's follower
//! and read-through.

pub mod apply;
/// Set-aside databases (replaced, divergent) until merged or dismissed.
pub mod aside;
pub mod capture;
pub mod divergent;
pub mod files;
pub mod follower;
pub mod hydrate;
pub mod legacy;
/// The bucket's manifest lives below both replication and the lease.
pub use crate::manifest;
#[cfg(test)]
mod model;
pub mod node;
pub mod restore;
pub mod roles;
pub mod tail;
pub mod uploader;
pub mod verify;
