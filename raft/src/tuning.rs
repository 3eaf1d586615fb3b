//! Per-node sizes of the RocksDB memtables of the log store and the state machine.
//!
//! Replicas append and apply the same entries, so memtables of equal size fill at the same log
//! position on every node and all nodes flush them at the same moment. On a small machine that
//! is a burst of flush work on every replica at once, and a commit needs the leader and a
//! follower: the tail benchmark's slowest pushes sat on such moments (BENCHMARKS.md, run N). The
//! big memtables are therefore sized by node id, around the same mean, so their flushes drift
//! apart.

/// Mean memtable size of the state machine's Mail column family. Its flush sorts the whole
/// hash-skiplist memtable first (run M: 170-530 ms at 64 MiB).
pub(crate) const MAIL_MEMTABLE_BYTES: usize = 16 << 20;
/// Mean memtable size of the Raft log's entries column family (RocksDB's default size).
pub(crate) const LOG_MEMTABLE_BYTES: usize = 64 << 20;

/// Memtable sizes of one node's DBs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuning {
    /// Memtable size of the state machine's Mail column family.
    pub mail_memtable_bytes: usize,
    /// Memtable size of the Raft log's entries column family.
    pub log_memtable_bytes: usize,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            mail_memtable_bytes: MAIL_MEMTABLE_BYTES,
            log_memtable_bytes: LOG_MEMTABLE_BYTES,
        }
    }
}

impl Tuning {
    /// The sizes for node `id`: the mean plus (id mod 5 - 2) eighths of it, so any five
    /// consecutive ids differ (nodes 1 / 2 / 3 get 7/8, 8/8 and 9/8 of the mean).
    pub fn for_node(id: u64) -> Self {
        let step = (id % 5) as usize; // < 5
        let spread = |mean: usize| mean - mean / 4 + step * (mean / 8);
        Tuning {
            mail_memtable_bytes: spread(MAIL_MEMTABLE_BYTES),
            log_memtable_bytes: spread(LOG_MEMTABLE_BYTES),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neighbouring_nodes_get_different_memtables_around_the_mean() {
        for (mean, size) in [
            (
                MAIL_MEMTABLE_BYTES,
                (|t: Tuning| t.mail_memtable_bytes) as fn(Tuning) -> usize,
            ),
            (LOG_MEMTABLE_BYTES, |t: Tuning| t.log_memtable_bytes),
        ] {
            let sizes: Vec<usize> = (1..=5).map(|id| size(Tuning::for_node(id))).collect();
            for (i, a) in sizes.iter().enumerate() {
                assert!(
                    (mean * 3 / 4..=mean * 5 / 4).contains(a),
                    "node {}: {a} bytes",
                    i + 1
                );
                for b in &sizes[i + 1..] {
                    assert_ne!(a, b, "two of nodes 1-5 share a memtable size: {sizes:?}");
                }
            }
            assert_eq!(sizes.iter().sum::<usize>() / sizes.len(), mean);
            // Ids wrap around: node 6 is sized like node 1.
            assert_eq!(size(Tuning::for_node(6)), sizes[0]);
        }
    }
}
