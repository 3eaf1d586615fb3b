//! SIGTERM stops a node cleanly: exit code 0 within a few seconds and "node stopped" in its log,
//! whether it follows, leads, or is the last one left (no quorum).

use std::time::Duration;

use crate::harness::Cluster;

/// A clean stop must take at most this long (the node's own grace period is 10 s).
const CLEAN_STOP: Duration = Duration::from_secs(8);

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_followers_leaders_and_the_last_node_cleanly() {
    // Started as an operator would: no --exit-with-stdin.
    let mut c = Cluster::new(3).without_lifeline();
    c.start_all();
    let leader = c.wait_leader().await;
    let app = c.create_app("shutdown").await;
    app.push_acked(c.grpc_addr(leader), "alice", "hi", "k1").await;
    let follower = c.ids().into_iter().find(|i| *i != leader).unwrap();
    let last = c
        .ids()
        .into_iter()
        .find(|i| *i != leader && *i != follower)
        .unwrap();

    for (id, role) in [(follower, "follower"), (leader, "leader"), (last, "last node")] {
        let (status, took) = c.stop(id).await;
        assert_eq!(status.code(), Some(0), "{role} (node {id}) exit status {status}");
        assert!(took <= CLEAN_STOP, "{role} (node {id}) took {took:?} to stop");
        let log = c.log_text(id);
        assert!(log.contains("sigterm received"), "{role} (node {id}) log: {log}");
        assert!(log.contains("node stopped"), "{role} (node {id}) log: {log}");
        assert!(
            !log.contains("shutdown did not finish"),
            "{role} (node {id}) hit its grace timeout: {log}"
        );
        eprintln!("{role} (node {id}) stopped in {took:?}");
    }
    c.assert_no_panics();
}
