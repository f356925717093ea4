//! Replication: the primary's capture and uploader, the secondary's follower.

pub mod legacy;
pub mod manifest;
pub mod restore;
