//! The two planes (docs/SECURITY.md): the public gRPC port serves the app/admin API only; the
//! cluster port serves node-to-node services to nodes that present a certificate of this
//! cluster's CA naming a current member; the CA can be rotated without downtime.

use std::path::Path;
use std::time::Duration;

use herald_proto::peer::peer_client::PeerClient;
use herald_proto::peer::{AppliedIndexRequest, DeliverRequest, RatesRequest};
use herald_proto::raft::raft_service_client::RaftServiceClient;
use herald_proto::raft::{ForwardRequest, ProbeRequest, RaftBatch, RaftRequest, SnapshotChunk};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic::Code;

use crate::harness::{Cluster, ClusterTlsSpec};

async fn plain(addr: &str) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"))
}

/// A TLS channel to node `target`'s cluster port: trusting `ca`, presenting `identity` if any.
pub(crate) async fn tls(
    addr: &str,
    target: u64,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<Channel, String> {
    let mut cfg = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()))
        .domain_name(format!("herald-node-{target}"));
    if let Some((cert, key)) = identity {
        cfg = cfg.identity(Identity::from_pem(
            std::fs::read(cert).unwrap(),
            std::fs::read(key).unwrap(),
        ));
    }
    Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(cfg)
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))
}

/// Every node-to-node RPC, called on `channel`; returns each one's status code.
pub(crate) async fn internal_rpcs(channel: &Channel) -> Vec<(&'static str, Code)> {
    let mut raft = RaftServiceClient::new(channel.clone());
    let mut peer = PeerClient::new(channel.clone());
    let req = || RaftRequest {
        from: 9,
        target: 1,
        payload: b"forged".to_vec().into(),
        group: 0,
    };
    let code = |r: Result<tonic::Code, tonic::Status>| r.unwrap_or_else(|s| s.code());
    vec![
        (
            "AppendEntries",
            code(raft.append_entries(req()).await.map(|_| Code::Ok)),
        ),
        ("Vote", code(raft.vote(req()).await.map(|_| Code::Ok))),
        (
            "AppendEntriesBatch",
            code(
                raft.append_entries_batch(RaftBatch {
                    requests: vec![req()],
                })
                .await
                .map(|_| Code::Ok),
            ),
        ),
        (
            "InstallSnapshot",
            code(
                raft.install_snapshot(tokio_stream::iter(vec![SnapshotChunk::default()]))
                    .await
                    .map(|_| Code::Ok),
            ),
        ),
        (
            "Forward",
            code(
                raft.forward(ForwardRequest {
                    from: 9,
                    target: 1,
                    ops: b"forged".to_vec().into(),
                    group: 0,
                })
                .await
                .map(|_| Code::Ok),
            ),
        ),
        (
            "Probe",
            code(
                raft.probe(ProbeRequest {
                    from: 9,
                    target: 1,
                    ..Default::default()
                })
                .await
                .map(|_| Code::Ok),
            ),
        ),
        (
            "Deliver",
            code(
                peer.deliver(DeliverRequest {
                    from: 9,
                    app: "demo".into(),
                    user: "alice".into(),
                    msg_id: "forged".into(),
                    payload: b"forged".to_vec().into(),
                    ..Default::default()
                })
                .await
                .map(|_| Code::Ok),
            ),
        ),
        ("Rates", code(peer.rates(RatesRequest {}).await.map(|_| Code::Ok))),
        (
            "AppliedIndex",
            code(
                peer.applied_index(AppliedIndexRequest::default())
                    .await
                    .map(|_| Code::Ok),
            ),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn internal_rpcs_on_the_public_port_are_unimplemented_and_not_advertised() {
    let c = Cluster::start(3).await;
    let leader = c.wait_leader().await;
    let public = plain(c.grpc_addr(leader)).await;
    let answers = internal_rpcs(&public).await;
    assert_eq!(answers.len(), 9);
    for (rpc, code) in &answers {
        assert_eq!(
            *code,
            Code::Unimplemented,
            "{rpc} on the public port: {answers:?}"
        );
    }
    let mut services = crate::room::reflected_services(&public).await;
    services.sort();
    assert_eq!(
        services,
        [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "herald.v1.Archive",
            "herald.v1.Herald",
        ],
        "the public port's reflection lists public services only"
    );
    c.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cluster_port_lets_in_members_only() {
    let c = Cluster::start(3).await;
    let leader = c.wait_leader().await;
    let addr = c.cluster_addr(leader).to_string();
    let certs = c.certs_dir();
    let ca = certs.join("ca.pem");

    // Plaintext: the TLS listener does not speak plain HTTP/2, so no call gets through.
    let plain_calls = match Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
    {
        Ok(ch) => internal_rpcs(&ch).await,
        Err(_) => Vec::new(),
    };
    assert!(
        plain_calls
            .iter()
            .all(|(_, code)| *code != Code::Ok && *code != Code::Unimplemented),
        "plaintext calls on the cluster port: {plain_calls:?}"
    );

    // TLS without a client certificate: the handshake (or the first call) fails.
    if let Ok(ch) = tls(&addr, leader, &ca, None).await {
        for (rpc, code) in internal_rpcs(&ch).await {
            assert_ne!(code, Code::Ok, "{rpc} without a client certificate");
        }
    }

    // A certificate of another cluster's CA: refused by the handshake.
    let other = c.dir().join("other-certs");
    herald_node::certs::ensure_cluster(&other, [1]).unwrap();
    let (oc, ok) = herald_node::certs::node_paths(&other, 1);
    if let Ok(ch) = tls(&addr, leader, &ca, Some((&oc, &ok))).await {
        for (rpc, code) in internal_rpcs(&ch).await {
            assert_ne!(code, Code::Ok, "{rpc} with another cluster's certificate");
        }
    }

    // This cluster's CA, but a node that is not a member (id 9): every call PERMISSION_DENIED.
    herald_node::certs::create_node(&certs, 9, &[]).unwrap();
    let (c9, k9) = herald_node::certs::node_paths(&certs, 9);
    let ch = tls(&addr, leader, &ca, Some((&c9, &k9)))
        .await
        .expect("handshake with a CA-signed cert");
    for (rpc, code) in internal_rpcs(&ch).await {
        assert_eq!(code, Code::PermissionDenied, "{rpc} from non-member node 9");
    }

    // A member's certificate gets through (the probe answers with the node's identity).
    let other_id = c.ids().into_iter().find(|i| *i != leader).unwrap();
    let (mc, mk) = herald_node::certs::node_paths(&certs, other_id);
    let ch = tls(&addr, leader, &ca, Some((&mc, &mk)))
        .await
        .expect("member handshake");
    let probe = RaftServiceClient::new(ch)
        .probe(ProbeRequest {
            from: other_id,
            target: leader,
            ..Default::default()
        })
        .await
        .expect("a member's probe is answered")
        .into_inner();
    assert_eq!(probe.node_id, leader);

    // The client side checks the server too: node `leader`'s port is not node 9.
    let wrong = tls(&addr, 9, &ca, Some((&mc, &mk))).await;
    if let Ok(ch) = wrong {
        let r = RaftServiceClient::new(ch).probe(ProbeRequest::default()).await;
        assert!(
            r.is_err(),
            "a server that is not herald-node-9 must not pass as it"
        );
    }
    c.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plaintext_cluster_needs_the_flag_and_warns() {
    let mut c = Cluster::new(3);
    for id in c.ids() {
        c.spec_mut(id).cluster_tls = ClusterTlsSpec::Insecure;
    }
    c.start_all();
    let leader = c.wait_leader().await;
    let app = c.create_app("plain").await;
    app.push_acked(c.grpc_addr(leader), "u", "hi", "k1").await;
    for id in c.ids() {
        c.wait_log(id, "--insecure-cluster: node-to-node traffic is plaintext", 1)
            .await;
    }
    c.assert_no_panics();
}

/// Rotation without downtime (docs/SECURITY.md "Rotating the cluster CA"): trust the new CA beside
/// the old one, move every node to a certificate of the new CA, drop the old CA — one rolling
/// restart per step, pushes committed between every restart, never a lost quorum.
#[tokio::test(flavor = "multi_thread")]
async fn the_cluster_ca_rotates_with_rolling_restarts() {
    let mut c = Cluster::start(3).await;
    let app = c.create_app("rotate").await;
    let old = c.certs_dir();
    let new = c.dir().join("certs-new");
    herald_node::certs::create_ca(&new, "Herald cluster CA 2").unwrap();
    let bundle = c.dir().join("ca-bundle.pem");
    let mut both = std::fs::read(old.join("ca.pem")).unwrap();
    both.extend(std::fs::read(new.join("ca.pem")).unwrap());
    std::fs::write(&bundle, both).unwrap();
    for id in c.ids() {
        herald_node::certs::create_node(&new, id, &[]).unwrap();
    }

    let mut pushed = 0u64;
    let mut last_seq = 0;
    // Each step: for every node in turn, stop it, commit a push through another node while it is
    // down, start it with the step's files and wait until it caught up.
    let steps: [(&str, &dyn Fn(u64) -> ClusterTlsSpec); 3] = [
        ("trust both CAs", &|id| spec(&bundle, &old, id)),
        ("certificates of the new CA", &|id| spec(&bundle, &new, id)),
        ("drop the old CA", &|id| spec(&new.join("ca.pem"), &new, id)),
    ];
    for (what, tls) in steps {
        for id in c.ids() {
            let (status, _) = c.stop(id).await;
            assert!(status.success(), "{what}: node {id} stopped cleanly");
            let other = c.ids().into_iter().find(|i| *i != id).unwrap();
            pushed += 1;
            let r = app
                .push_acked(c.grpc_addr(other), "u", "m", &format!("k{pushed}"))
                .await;
            last_seq = r.seqs[0].seq;
            c.spec_mut(id).cluster_tls = tls(id);
            c.restart(id);
            c.wait_caught_up(id).await;
        }
    }
    let leader = c.wait_leader().await;
    pushed += 1;
    let r = app
        .push_acked(c.grpc_addr(leader), "u", "m", &format!("k{pushed}"))
        .await;
    assert_eq!(r.seqs[0].seq, last_seq + 1);
    assert_eq!(r.seqs[0].seq, pushed, "every push stored once, none lost");

    // After the rotation a certificate of the old CA is refused.
    let addr = c.cluster_addr(leader).to_string();
    let (oc, ok) = herald_node::certs::node_paths(&old, 1);
    if let Ok(ch) = tls(&addr, leader, &new.join("ca.pem"), Some((&oc, &ok))).await {
        let r = RaftServiceClient::new(ch).probe(ProbeRequest::default()).await;
        assert!(r.is_err(), "an old-CA certificate still gets in: {r:?}");
    }
    c.assert_no_panics();
}

/// Trust `ca`; present node `id`'s certificate from the `herald certs` directory `dir`.
fn spec(ca: &Path, dir: &Path, id: u64) -> ClusterTlsSpec {
    let (cert, key) = herald_node::certs::node_paths(dir, id);
    ClusterTlsSpec::Files {
        ca: ca.to_path_buf(),
        cert,
        key,
    }
}
