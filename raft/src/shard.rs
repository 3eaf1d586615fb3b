//! Which Raft group holds what: the shard of a user, and where a shard's replicas live.
//!
//! A cluster created with S shards has S + 1 groups: group 0, the metadata group (apps, node
//! addresses, the shard map), and groups 1..=S, the shards holding per-user state (sessions,
//! mailboxes, cursors, idempotency keys). A user's shard is a pure function of (app, user) and S,
//! so every node computes it the same way without asking anyone:
//!
//! - the key is hashed with 64-bit FNV-1a over `app`, a 0xff separator (a byte no UTF-8 string
//!   holds, so ("ab", "c") and ("a", "bc") differ) and `user`: fixed by its specification, so the
//!   result never changes with a Rust release (std's `DefaultHasher` may);
//! - the hash picks a bucket with jump consistent hashing (Lamping and Veach, 2014): uniform over
//!   the buckets, and going from S to S + 1 moves only the keys that land in the new bucket
//!   (about 1/(S+1) of them), which keeps a later split cheap if one is ever added.
//!
//! Placement ([`place`]) gives each node S·R/N replicas (rounded either way) and makes each the
//! preferred leader of about S/N shards.

use std::collections::BTreeMap;

use crate::types::{GroupId, NodeId};

/// The metadata group's id.
pub const META_GROUP: GroupId = 0;

/// 64-bit FNV-1a of (app, user).
pub fn key_hash(app: &str, user: &str) -> u64 {
    fnv1a(app.as_bytes().iter().chain(&[0xff]).chain(user.as_bytes()))
}

fn fnv1a<'a>(bytes: impl Iterator<Item = &'a u8>) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = OFFSET;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(PRIME);
    }
    h
}

/// Jump consistent hash: a bucket in `0..buckets` for `key` (`buckets` must be at least 1).
pub fn jump_bucket(mut key: u64, buckets: u32) -> u32 {
    let buckets = i64::from(buckets.max(1));
    let mut b: i64 = -1;
    let mut j: i64 = 0;
    while j < buckets {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        // (b + 1) * 2^31 / ((key >> 33) + 1), in floating point as the algorithm specifies.
        let r = ((key >> 33) + 1) as f64;
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / r)) as i64;
    }
    b as u32
}

/// The shard group (1..=`shards`) holding `user` of `app`'s state; with no shards (a
/// single-group cluster), the one group, 0.
pub fn shard_of(app: &str, user: &str, shards: u32) -> GroupId {
    if shards == 0 {
        return META_GROUP;
    }
    1 + jump_bucket(key_hash(app, user), shards)
}

/// The shard group holding topic `topic` of `app` (the app's broadcast is its topic `*`); 0 with
/// no shards. Hashed like a user with a 0xfe byte in front of the name, which no UTF-8 user id
/// holds, so a topic and a user of the same name are independent keys.
pub fn topic_shard(app: &str, topic: &str, shards: u32) -> GroupId {
    if shards == 0 {
        return META_GROUP;
    }
    let h = fnv1a(app.as_bytes().iter().chain(&[0xff, 0xfe]).chain(topic.as_bytes()));
    1 + jump_bucket(h, shards)
}

/// Where each shard's replicas go: `replicas` distinct nodes (at most all of them) per shard, the
/// first its preferred leader. Shard by shard, the replicas go to the nodes holding the fewest so
/// far (ties: in the node order rotated by one per shard), so replica counts differ by at most one;
/// the preferred leader is the one of them leading the fewest shards so far. `nodes` in any
/// order: the result depends only on the set.
pub fn place(shards: u32, nodes: &[NodeId], replicas: usize) -> BTreeMap<GroupId, Vec<NodeId>> {
    let mut nodes = nodes.to_vec();
    nodes.sort_unstable();
    nodes.dedup();
    let n = nodes.len();
    let r = replicas.min(n);
    let (mut held, mut leads) = (vec![0usize; n], vec![0usize; n]);
    let mut out = BTreeMap::new();
    for shard in 1..=shards {
        let offset = (shard as usize - 1) % n.max(1);
        let mut order: Vec<usize> = (0..n).map(|k| (offset + k) % n).collect();
        // Stable: among equally loaded nodes the rotated order decides.
        order.sort_by_key(|i| held[*i]);
        let mut chosen = order[..r].to_vec();
        if let Some(first) = (0..r).min_by_key(|j| leads[chosen[*j]]) {
            chosen.swap(0, first);
            leads[chosen[0]] += 1;
        }
        for i in &chosen {
            held[*i] += 1;
        }
        out.insert(shard, chosen.into_iter().map(|i| nodes[i]).collect());
    }
    out
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn the_hash_is_fnv1a_and_fixed() {
        // FNV-1a of the empty input is its offset basis; of "a" a published test vector.
        let fnv = |bytes: &[u8]| {
            let mut h: u64 = 0xcbf2_9ce4_8422_2325;
            for b in bytes {
                h ^= u64::from(*b);
                h = h.wrapping_mul(0x0000_0100_0000_01b3);
            }
            h
        };
        assert_eq!(fnv(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(key_hash("app", "user"), fnv(b"app\xffuser"));
        assert_ne!(key_hash("ab", "c"), key_hash("a", "bc"));
        // Pinned: a change here moves every user of every cluster to another shard.
        assert_eq!(shard_of("app1", "alice", 8), shard_of("app1", "alice", 8));
        assert_eq!(jump_bucket(0, 1), 0);
        assert_eq!(
            (0..16u64).map(|k| jump_bucket(k, 8)).collect::<Vec<_>>(),
            (0..16u64).map(|k| jump_bucket(k, 8)).collect::<Vec<_>>()
        );
    }

    #[test]
    fn users_spread_evenly_over_shards() {
        let shards = 8;
        let mut counts = [0u32; 8];
        for i in 0..80_000 {
            let g = shard_of("app", &format!("user-{i}"), shards);
            assert!((1..=shards).contains(&g));
            counts[(g - 1) as usize] += 1;
        }
        for c in counts {
            assert!((9_000..11_000).contains(&c), "{counts:?}");
        }
        assert_eq!(shard_of("app", "u", 0), META_GROUP);
    }

    #[test]
    fn topics_spread_over_shards_apart_from_users_of_the_same_name() {
        let shards = 8;
        let mut counts = [0u32; 8];
        let mut same = 0;
        for i in 0..8_000 {
            let name = format!("t-{i}");
            let g = topic_shard("app", &name, shards);
            assert!((1..=shards).contains(&g));
            counts[(g - 1) as usize] += 1;
            same += u32::from(g == shard_of("app", &name, shards));
        }
        for c in counts {
            assert!((800..1_200).contains(&c), "{counts:?}");
        }
        // Independent keys: about 1 in 8 land together, not all of them.
        assert!(
            (700..1_300).contains(&same),
            "{same} of 8000 topics share their user's shard"
        );
        assert_eq!(topic_shard("app", "*", 0), META_GROUP);
    }

    #[test]
    fn placement_spreads_replicas_and_preferred_leaders() {
        let nodes = [6, 2, 4, 1, 3, 5];
        let p = place(8, &nodes, 3);
        assert_eq!(p.len(), 8);
        let mut replicas: BTreeMap<NodeId, usize> = BTreeMap::new();
        let mut firsts: BTreeMap<NodeId, usize> = BTreeMap::new();
        for members in p.values() {
            assert_eq!(members.len(), 3);
            let mut distinct = members.clone();
            distinct.sort_unstable();
            distinct.dedup();
            assert_eq!(distinct.len(), 3, "{members:?}");
            *firsts.entry(members[0]).or_default() += 1;
            for m in members {
                *replicas.entry(*m).or_default() += 1;
            }
        }
        assert_eq!(
            firsts.len(),
            6,
            "every node is the preferred leader of a shard: {firsts:?}"
        );
        assert!(
            replicas.values().all(|r| *r == 4),
            "24 replicas on 6 nodes: {replicas:?}"
        );
        assert_eq!(
            place(8, &[1, 2, 3, 4, 5, 6], 3),
            p,
            "the order of the node list does not matter"
        );
        // Fewer nodes than replicas: every node holds every shard.
        assert!(place(2, &[1, 2], 3).values().all(|m| m.len() == 2));
        // Three nodes, three replicas: every node holds every shard and leads a third of them.
        let three = place(9, &[1, 2, 3], 3);
        let mut leads: BTreeMap<NodeId, usize> = BTreeMap::new();
        for m in three.values() {
            *leads.entry(m[0]).or_default() += 1;
        }
        assert_eq!(leads.values().copied().collect::<Vec<_>>(), vec![3, 3, 3]);
    }

    proptest! {
        #[test]
        fn growing_the_shard_count_moves_only_keys_to_the_new_shard(key: u64, s in 1u32..64) {
            let before = jump_bucket(key, s);
            let after = jump_bucket(key, s + 1);
            prop_assert!(after == before || after == s);
            prop_assert!(before < s);
        }
    }
}
