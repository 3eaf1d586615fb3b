//! The dispatcher: which nodes a client should try, best first.
//!
//! Healthy members first; among them, less loaded ones first (by load decile relative to the
//! busiest member, so small differences do not reshuffle), then by a rendezvous hash of
//! (user, node) so one user keeps landing on the same node and, when a node goes away, only its
//! users move.

use herald_proto::v1 as pb;
use herald_raft::StoreError;

use crate::node::Node;

pub const BACKOFF_INITIAL_MS: u32 = 500;
pub const BACKOFF_MAX_MS: u32 = 30_000;

/// Rendezvous (highest random weight) score of `user` on `node`: FNV-1a, then a 64-bit mix.
pub fn hrw(user: &str, node: u64) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in user.as_bytes().iter().chain(node.to_be_bytes().iter()) {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    // splitmix64 finalizer spreads nearby inputs.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58476d1ce4e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d049bb133111eb);
    h ^ (h >> 31)
}

pub fn order(node: &Node, user: &str, transport: &str) -> Result<Vec<pb::DispatchNode>, StoreError> {
    let infos = node.groups().meta().reader().nodes()?;
    let members: Vec<u64> = node.groups().meta().member_ids();
    let states = node.peers().states();
    let me = node.config().id;
    let mut candidates = Vec::new();
    for info in infos.into_iter().filter(|i| members.contains(&i.id)) {
        let addr = match transport {
            "tls" => info.tls_addr,
            "ws" => info.ws_addr,
            _ => info.client_addr,
        };
        if addr.is_empty() {
            continue;
        }
        let (healthy, connections) = if info.id == me {
            (node.room().accepting(), node.room().connections())
        } else {
            states
                .get(&info.id)
                .map(|s| (s.reachable, s.connections))
                .unwrap_or((false, 0))
        };
        candidates.push((healthy, connections, info.id, addr));
    }
    let busiest = candidates.iter().map(|c| c.1).max().unwrap_or(0);
    candidates.sort_by_key(|(healthy, conns, id, _)| {
        let decile = if busiest == 0 {
            0
        } else {
            conns * 10 / (busiest + 1)
        };
        (!healthy, decile, std::cmp::Reverse(hrw(user, *id)))
    });
    Ok(candidates
        .into_iter()
        .map(|(_, connections, node_id, addr)| pb::DispatchNode {
            node_id,
            addr,
            connections,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hrw_spreads_users_and_moves_only_the_lost_nodes_users() {
        let nodes = [1u64, 2, 3];
        let best = |user: &str, nodes: &[u64]| *nodes.iter().max_by_key(|n| hrw(user, **n)).unwrap();
        let mut counts = [0usize; 4];
        let mut moved = 0;
        for i in 0..3000 {
            let u = format!("user-{i}");
            let b = best(&u, &nodes);
            counts[b as usize] += 1;
            let after = best(&u, &[1, 3]);
            if b != 2 && after != b {
                moved += 1;
            }
        }
        for (n, c) in counts.iter().enumerate().skip(1) {
            assert!(*c > 800 && *c < 1200, "node {n} got {c}");
        }
        assert_eq!(moved, 0, "users of the surviving nodes stay put");
    }
}
