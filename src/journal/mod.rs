//! The local journal of captured transactions and the object formats the
//! journal is shipped in (segments and snapshots, see docs/FORMAT.md).

pub mod codec;

pub use codec::Txn;
