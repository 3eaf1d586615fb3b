//! Forming a cluster: a fresh set of nodes initializes exactly once, a restarted set rejoins the
//! same cluster, and nodes that disagree about `--peers` refuse to form one.

use std::collections::BTreeMap;
use std::time::Duration;

use herald_proto::v1 as pb;

use crate::harness::{admin_request, eventually, free_port, Cluster, LEADER_WAIT};

/// What every node must agree on.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Agreed {
    leader: u64,
    term: u64,
    /// Voter id -> gRPC address.
    voters: BTreeMap<u64, String>,
}

/// Waits until every node of `c` answers with the same leader, term and voters.
async fn all_agree(c: &Cluster) -> Agreed {
    eventually(
        "every node to agree on leader, term and voters",
        LEADER_WAIT,
        || async {
            let mut views = Vec::new();
            for id in c.ids() {
                let s = c.status(id).await?;
                anyhow::ensure!(s.has_leader, "node {id} knows no leader");
                let voters = s
                    .members
                    .iter()
                    .filter(|m| m.role == "voter")
                    .map(|m| (m.node_id, m.cluster_addr.clone()))
                    .collect();
                views.push(Agreed {
                    leader: s.leader_id,
                    term: s.term,
                    voters,
                });
            }
            anyhow::ensure!(views.windows(2).all(|w| w[0] == w[1]), "views differ: {views:?}");
            Ok(views.remove(0))
        },
    )
    .await
}

fn initialized_count(c: &Cluster) -> usize {
    c.ids()
        .into_iter()
        .map(|id| c.log_count(id, "cluster initialized"))
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn simultaneous_start_bootstraps_exactly_once_and_restart_rejoins() {
    let mut c = Cluster::new(3);
    c.start_all(); // three fresh processes spawned back to back
    let first = all_agree(&c).await;
    let expected: BTreeMap<u64, String> = c
        .ids()
        .into_iter()
        .map(|id| (id, c.cluster_addr(id).to_string()))
        .collect();
    assert_eq!(
        first.voters, expected,
        "membership must be the three configured peers"
    );
    assert!(first.term >= 1);
    assert_eq!(
        initialized_count(&c),
        1,
        "exactly one node initializes the cluster"
    );
    let app = c.create_app("before-restart").await;
    let before = all_agree(&c).await;

    // Restart all three on their data dirs: a clean stop, then start them together again.
    for id in c.ids() {
        c.sigterm(id);
    }
    for id in c.ids() {
        let status = c.wait_exit(id, crate::harness::EXIT_WAIT).await;
        assert!(status.success(), "node {id} exited with {status}");
    }
    c.start_all();
    let second = all_agree(&c).await;
    assert_eq!(second.voters, first.voters, "same cluster after restart");
    assert!(
        second.term >= before.term,
        "term went back from {} to {}: the cluster was re-created",
        before.term,
        second.term
    );
    assert_eq!(
        initialized_count(&c),
        1,
        "a restarted cluster must not initialize again"
    );
    // The state is the same cluster's too.
    for id in c.ids() {
        let g = c.client(id).await;
        let got = eventually(
            &format!("node {id} to serve app {:?}", app.id),
            LEADER_WAIT,
            || {
                let mut g = g.clone();
                let app_id = app.id.clone();
                async move {
                    let r = g.get_app(admin_request(pb::GetAppRequest { id: app_id })).await?;
                    Ok(r.into_inner().app.unwrap_or_default())
                }
            },
        )
        .await;
        assert_eq!(got.api_keys, vec![app.api_key.clone()], "node {id}");
    }
    c.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread")]
async fn peers_that_disagree_form_no_cluster() {
    let mut c = Cluster::new(3);
    // Node 1 says the cluster is 1,2,3; nodes 2 and 3 say it also has a node 4.
    let other = format!("{},4=127.0.0.1:{}", c.peers(), free_port());
    c.spec_mut(2).peers = other.clone();
    c.spec_mut(3).peers = other;
    c.start_all();

    // Node 1 (the lowest id, the only one that may bootstrap) refuses, says why, and keeps
    // refusing (the second line comes from its next attempt).
    let line = c.wait_log(1, "not bootstrapping", 2).await;
    assert!(
        line.contains("is configured with peers") && line.contains("this node with"),
        "the reason must name the disagreement: {line}"
    );
    assert!(
        line.contains("4: \""),
        "the reason must show the other list (with node 4): {line}"
    );

    for id in c.ids() {
        let s = c
            .status(id)
            .await
            .unwrap_or_else(|e| panic!("node {id} must still answer: {e:#}"));
        assert!(!s.has_leader, "node {id} reports a leader: {s:?}");
        assert!(s.members.is_empty(), "node {id} has members: {s:?}");
        assert!(c.is_running(id), "node {id} exited");
    }
    assert_eq!(initialized_count(&c), 0, "no node may initialize");
    // A write cannot commit anywhere.
    let mut g = c.client(2).await;
    let err = tokio::time::timeout(
        Duration::from_secs(20),
        g.create_app(admin_request(pb::CreateAppRequest {
            id: "nope".into(),
            ..Default::default()
        })),
    )
    .await
    .expect("CreateApp must fail within the write timeout")
    .expect_err("no cluster, no commit");
    assert!(
        matches!(
            err.code(),
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
        ),
        "{err:?}"
    );
    c.assert_no_panics();
}
