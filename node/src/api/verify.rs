//! `VerifyReplicas` (`herald cluster verify`): do the replicas hold the same state?
//!
//! Every member computes a digest of its whole state machine (`StateReader::state_hash`: apps,
//! sessions, mailboxes with seqs and msg ids, cursors, topics, outboxes) together with the applied
//! index it belongs to. Replicas that applied the same log prefix must have equal digests; the
//! call asks every member until all report the same index (a quiet moment), then compares. A
//! member that does not answer makes the answer "unknown", never "consistent".

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use herald_proto::v1 as pb;
use herald_raft::NodeId;

use crate::node::Node;

/// Default and largest wait for the members to stand at one index.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest one member may take to compute and send its digest.
const PER_MEMBER: Duration = Duration::from_secs(5);

/// What one round of digests says.
#[derive(Debug, PartialEq, Eq)]
enum Round {
    Consistent,
    Diverged,
    /// Not comparable yet (a member missing, or indexes differ): why.
    NotYet(String),
}

/// A member's digest as (applied index, hash), or why it gave none.
type Digest = (NodeId, Result<(u64, u64), String>);

fn judge(digests: &[Digest]) -> Round {
    if digests.is_empty() {
        return Round::NotYet("no members".into());
    }
    let missing: Vec<String> = digests
        .iter()
        .filter_map(|(id, r)| r.as_ref().err().map(|e| format!("node {id}: {e}")))
        .collect();
    if !missing.is_empty() {
        return Round::NotYet(missing.join("; "));
    }
    let indexes: BTreeSet<u64> = digests
        .iter()
        .filter_map(|(_, r)| r.as_ref().ok().map(|d| d.0))
        .collect();
    if indexes.len() > 1 {
        return Round::NotYet(format!("members stand at different applied indexes {indexes:?}"));
    }
    let hashes: BTreeSet<u64> = digests
        .iter()
        .filter_map(|(_, r)| r.as_ref().ok().map(|d| d.1))
        .collect();
    if hashes.len() == 1 {
        Round::Consistent
    } else {
        Round::Diverged
    }
}

/// Asks until the members are comparable or `timeout_ms` passed, group by group (each Raft
/// group's replicas are compared with each other): "consistent" only when every group is.
pub async fn verify(node: &Node, timeout_ms: u64) -> pb::VerifyReplicasReply {
    let timeout = match timeout_ms {
        0 => DEFAULT_TIMEOUT,
        ms => Duration::from_millis(ms).min(MAX_TIMEOUT),
    };
    let deadline = Instant::now() + timeout;
    let mut reply = pb::VerifyReplicasReply {
        verdict: "consistent".into(),
        ..Default::default()
    };
    let sharded = node.groups().shards() > 0;
    for raft in node.groups().all() {
        let (verdict, detail, digests) = verify_group(raft, deadline).await;
        let group = raft.group();
        if verdict == "diverged" {
            tracing::error!(group, ?digests, "replicas diverged");
        }
        // The worst verdict wins: diverged, then unknown, then consistent.
        let rank = |v: &str| match v {
            "diverged" => 2,
            "unknown" => 1,
            _ => 0,
        };
        if rank(verdict) > rank(&reply.verdict) {
            reply.verdict = verdict.into();
        }
        if !detail.is_empty() {
            let detail = if sharded {
                format!("group {group}: {detail}")
            } else {
                detail
            };
            if !reply.detail.is_empty() {
                reply.detail.push_str("; ");
            }
            reply.detail.push_str(&detail);
        }
        reply.replicas.extend(digests.into_iter().map(|(id, r)| match r {
            Ok((index, hash)) => pb::ReplicaDigest {
                node_id: id,
                applied_index: index,
                digest: format!("{hash:016x}"),
                error: String::new(),
                group,
            },
            Err(e) => pb::ReplicaDigest {
                node_id: id,
                error: e,
                group,
                ..Default::default()
            },
        }));
    }
    reply
}

/// One group's verdict, why (when not consistent) and its members' digests.
async fn verify_group(
    raft: &herald_raft::RaftNode,
    deadline: Instant,
) -> (&'static str, String, Vec<Digest>) {
    loop {
        let digests = raft.state_hashes(PER_MEMBER).await;
        match judge(&digests) {
            Round::Consistent => return ("consistent", String::new(), digests),
            Round::Diverged => {
                let why = "members at the same applied index hold different state".to_string();
                return ("diverged", why, digests);
            }
            Round::NotYet(why) if Instant::now() >= deadline => return ("unknown", why, digests),
            Round::NotYet(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_equal_digests_at_one_index_are_consistent() {
        assert_eq!(judge(&[(1, Ok((5, 9))), (2, Ok((5, 9)))]), Round::Consistent);
        assert_eq!(judge(&[(1, Ok((5, 9))), (2, Ok((5, 8)))]), Round::Diverged);
        assert!(matches!(
            judge(&[(1, Ok((5, 9))), (2, Ok((6, 9)))]),
            Round::NotYet(_)
        ));
        assert!(matches!(
            judge(&[(1, Ok((5, 9))), (2, Err("down".into()))]),
            Round::NotYet(_)
        ));
        assert!(matches!(judge(&[]), Round::NotYet(_)));
    }
}
