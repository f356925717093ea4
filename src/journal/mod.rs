//! The local journal (captured transactions, durable before the committing write
//! returns) and the segment/snapshot codecs of the bucket's objects.

pub mod base;
pub mod codec;
pub mod store;

pub use codec::Txn;
pub use store::{DbHead, Journal};
