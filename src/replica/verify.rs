//! The one verified apply path (docs/ARCHITECTURE.md, "Verifying the
//! bucket's history"): restore, a secondary's bootstrap (lazy or whole), the
//! follower, the end of hydration and promotion all take the bucket's
//! transactions through a [`Chain`], so a transaction is accepted only by
//! the same checks, in the same order, with the same typed errors:
//!
//! 1. txid chain: it is the next txid (a segment may start inside what is
//!    already applied, never past it);
//! 2. epoch owner: it was written under the epoch the manifest gives its
//!    txid (a deposed primary's tail is refused);
//! 3. pre-checksum: it continues from the database as it is;
//! 4. post-checksum: applying its pages gives the checksum it claims, when
//!    the pages are hashed (a lazily served file is hashed whole when its
//!    hydration ends, before anything is decided on it).

use crate::journal::codec::Txn;

/// Why a transaction (or a segment entered at a point) does not continue the
/// chain. Each names the object and the txid at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("txid chain gap: {key} starts at txid {from} but the chain is at {at}")]
    Gap { key: String, from: u64, at: u64 },
    #[error("{key} was written in epoch {epoch}, but the manifest gives txid {txid} to epoch {owner} (a deposed primary's tail)")]
    ForeignEpoch {
        key: String,
        epoch: u64,
        txid: u64,
        owner: u64,
    },
    #[error("{key}: checksum chain mismatch at txid {txid}: it continues from {found:016x}, but the database is {expected:016x}")]
    ChecksumChain {
        key: String,
        txid: u64,
        expected: u64,
        found: u64,
    },
    #[error("{key}: txid {txid}: after applying it the database checksum is {computed:016x}, it says {stored:016x}")]
    PostChecksum {
        key: String,
        txid: u64,
        stored: u64,
        computed: u64,
    },
}

/// Where a verified history stands: the last txid applied and the
/// whole-database checksum after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chain {
    pub at: u64,
    pub running: u64,
}

impl Chain {
    pub fn new(at: u64, running: u64) -> Chain {
        Chain { at, running }
    }

    /// Whether a segment `key` of txids `from..=to`, written under `epoch`
    /// and continuing from `pre`, can be entered here: it must not start past
    /// the next txid nor end before it, belong to the epoch `owner` the
    /// manifest gives its last txid (if it names one), and, when it starts
    /// exactly at the next txid, continue this checksum.
    pub fn enters(
        &self,
        key: &str,
        (from, to): (u64, u64),
        epoch: u64,
        pre: u64,
        owner: Option<u64>,
    ) -> Result<(), VerifyError> {
        if from > self.at + 1 || to <= self.at {
            return Err(VerifyError::Gap {
                key: key.to_string(),
                from,
                at: self.at,
            });
        }
        if let Some(owner) = owner.filter(|o| *o != epoch) {
            return Err(VerifyError::ForeignEpoch {
                key: key.to_string(),
                epoch,
                txid: to,
                owner,
            });
        }
        if from == self.at + 1 && pre != self.running {
            return Err(VerifyError::ChecksumChain {
                key: key.to_string(),
                txid: from,
                expected: self.running,
                found: pre,
            });
        }
        Ok(())
    }

    /// Verifies `t` (from object `key`) as the next transaction, applies it
    /// with `apply` (to a file, a set of page hashes, or nothing), and moves
    /// on. `owner`: the epoch the manifest gives `t.txid`, if it is to be
    /// checked per transaction. `apply` returns the checksum it recomputed,
    /// or None when the pages are not hashed yet (see the module doc).
    pub fn apply<E: From<VerifyError>>(
        &mut self,
        key: &str,
        t: &Txn,
        owner: Option<u64>,
        apply: impl FnOnce(&Txn) -> Result<Option<u64>, E>,
    ) -> Result<(), E> {
        if t.txid != self.at + 1 {
            return Err(VerifyError::Gap {
                key: key.to_string(),
                from: t.txid,
                at: self.at,
            }
            .into());
        }
        if let Some(owner) = owner.filter(|o| *o != t.epoch) {
            return Err(VerifyError::ForeignEpoch {
                key: key.to_string(),
                epoch: t.epoch,
                txid: t.txid,
                owner,
            }
            .into());
        }
        if t.pre_checksum != self.running {
            return Err(VerifyError::ChecksumChain {
                key: key.to_string(),
                txid: t.txid,
                expected: self.running,
                found: t.pre_checksum,
            }
            .into());
        }
        if let Some(computed) = apply(t)?.filter(|c| *c != t.post_checksum) {
            return Err(VerifyError::PostChecksum {
                key: key.to_string(),
                txid: t.txid,
                stored: t.post_checksum,
                computed,
            }
            .into());
        }
        self.at = t.txid;
        self.running = t.post_checksum;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn txn(txid: u64, epoch: u64, pre: u64, post: u64) -> Txn {
        Txn {
            txid,
            epoch,
            db_size_pages: 1,
            pre_checksum: pre,
            post_checksum: post,
            timestamp_ms: 0,
            pages: vec![(1, Bytes::from_static(b"x"))],
        }
    }

    fn ok(t: &Txn) -> Result<Option<u64>, VerifyError> {
        Ok(Some(t.post_checksum))
    }

    /// Each check refuses what it is for, in order, and leaves the chain
    /// where it was; a verified transaction moves it.
    #[test]
    fn each_check_refuses_and_a_good_transaction_moves_the_chain() {
        let mut c = Chain::new(4, 40);
        let e = c.apply("k", &txn(6, 1, 40, 50), None, ok).unwrap_err();
        assert!(matches!(e, VerifyError::Gap { from: 6, at: 4, .. }), "{e}");
        let e = c.apply("k", &txn(5, 1, 40, 50), Some(2), ok).unwrap_err();
        assert!(
            matches!(e, VerifyError::ForeignEpoch { owner: 2, .. }),
            "{e}"
        );
        let e = c.apply("k", &txn(5, 2, 41, 50), Some(2), ok).unwrap_err();
        assert!(
            matches!(e, VerifyError::ChecksumChain { found: 41, .. }),
            "{e}"
        );
        let bad = |_: &Txn| Ok::<_, VerifyError>(Some(51));
        let e = c.apply("k", &txn(5, 2, 40, 50), Some(2), bad).unwrap_err();
        assert!(
            matches!(e, VerifyError::PostChecksum { computed: 51, .. }),
            "{e}"
        );
        assert_eq!(c, Chain::new(4, 40));
        // Not hashed (a lazy view): the claimed checksum is carried on.
        c.apply("k", &txn(5, 2, 40, 50), Some(2), |_| {
            Ok::<_, VerifyError>(None)
        })
        .unwrap();
        assert_eq!(c, Chain::new(5, 50));
    }

    #[test]
    fn entering_a_segment() {
        let c = Chain::new(4, 40);
        // Starts inside what is applied: fine, whatever its first checksum.
        c.enters("k", (3, 6), 1, 7, Some(1)).unwrap();
        c.enters("k", (5, 6), 1, 40, None).unwrap();
        let gap = c.enters("k", (6, 7), 1, 40, None).unwrap_err();
        assert!(matches!(gap, VerifyError::Gap { .. }), "{gap}");
        let old = c.enters("k", (2, 4), 1, 40, None).unwrap_err();
        assert!(matches!(old, VerifyError::Gap { .. }), "{old}");
        let foreign = c.enters("k", (5, 6), 1, 40, Some(2)).unwrap_err();
        assert!(
            matches!(foreign, VerifyError::ForeignEpoch { txid: 6, .. }),
            "{foreign}"
        );
        let fork = c.enters("k", (5, 6), 1, 39, None).unwrap_err();
        assert!(matches!(fork, VerifyError::ChecksumChain { .. }), "{fork}");
    }
}
