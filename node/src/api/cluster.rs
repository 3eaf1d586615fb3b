//! Dispatch, VerifyReplicas, ClusterStatus, AddNode and RemoveNode: where clients connect, and
//! the cluster's members.

use std::collections::BTreeSet;

use herald_proto::v1 as pb;
use tonic::{Request, Response};

use super::error::ApiError;
use super::{auth, verify, HeraldApi, Reply};

pub(super) async fn dispatch(
    api: &HeraldApi,
    request: Request<pb::DispatchRequest>,
) -> Reply<pb::DispatchReply> {
    let r = request.into_inner();
    if r.user.is_empty() {
        return Err(ApiError::InvalidArgument("dispatch needs a user".into()).into());
    }
    let nodes = crate::dispatch::order(&api.node, &r.user, &r.transport).map_err(ApiError::from)?;
    let c = api.node.config();
    Ok(Response::new(pb::DispatchReply {
        nodes,
        heartbeat_ms: c.client_heartbeat.as_millis() as u32,
        heartbeat_min_ms: c.client_heartbeat_min.as_millis() as u32,
        heartbeat_max_ms: c.client_heartbeat_max.as_millis() as u32,
        backoff_initial_ms: crate::dispatch::BACKOFF_INITIAL_MS,
        backoff_max_ms: crate::dispatch::BACKOFF_MAX_MS,
    }))
}

pub(super) async fn verify_replicas(
    api: &HeraldApi,
    request: Request<pb::VerifyReplicasRequest>,
) -> Reply<pb::VerifyReplicasReply> {
    auth::admin(&api.node, &request)?;
    Ok(Response::new(
        verify::verify(&api.node, request.into_inner().timeout_ms).await,
    ))
}

pub(super) async fn cluster_status(api: &HeraldApi) -> Reply<pb::ClusterStatusReply> {
    let view = api.node.raft().cluster_view().await;
    let nodes = api.node.raft().reader().nodes().map_err(ApiError::from)?;
    let members = view
        .members
        .into_iter()
        .map(|m| {
            let p = m.probe.unwrap_or_default();
            let info = nodes.iter().find(|n| n.id == m.node_id);
            pb::MemberStatus {
                node_id: m.node_id,
                grpc_addr: info.map(|n| n.grpc_addr.clone()).unwrap_or_default(),
                cluster_addr: m.grpc_addr,
                client_addr: info.map(|n| n.client_addr.clone()).unwrap_or_default(),
                role: if m.voter { "voter" } else { "learner" }.into(),
                reachable: m.reachable,
                last_log_index: p.last_log_index,
                applied_index: p.applied_index,
                matched_index: m.matched_index.unwrap_or(0),
                state: if m.reachable {
                    p.state
                } else {
                    "unreachable".into()
                },
                connections: p.connections,
            }
        })
        .collect();
    Ok(Response::new(pb::ClusterStatusReply {
        node_id: view.node_id,
        leader_id: view.leader.unwrap_or(0),
        has_leader: view.leader.is_some(),
        term: view.term,
        committed_index: view.committed_index,
        members,
    }))
}

pub(super) async fn add_node(
    api: &HeraldApi,
    request: Request<pb::AddNodeRequest>,
) -> Reply<pb::MembershipReply> {
    auth::admin(&api.node, &request)?;
    if !api.node.raft().is_leader() {
        return api
            .node
            .forward_admin(request, |mut c, r| async move { c.add_node(r).await })
            .await;
    }
    let req = request.into_inner();
    tracing::Span::current().record("node_id", req.node_id);
    if req.node_id == 0 {
        return Err(ApiError::InvalidArgument("node id 0 is reserved".into()).into());
    }
    if req.cluster_addr.is_empty() {
        return Err(ApiError::InvalidArgument(
            "set cluster_addr: the new node's --cluster-addr (grpc_addr is no longer used to add a node)"
                .into(),
        )
        .into());
    }
    if crate::config::parse_peers(&format!("{}={}", req.node_id, req.cluster_addr)).is_err() {
        return Err(
            ApiError::InvalidArgument(format!("{:?} is not a host:port address", req.cluster_addr)).into(),
        );
    }
    let index = api
        .node
        .raft()
        .add_node(req.node_id, req.cluster_addr, req.learner_only)
        .await
        .map_err(ApiError::from)?;
    Ok(Response::new(api.membership_reply(index)))
}

pub(super) async fn remove_node(
    api: &HeraldApi,
    request: Request<pb::RemoveNodeRequest>,
) -> Reply<pb::MembershipReply> {
    auth::admin(&api.node, &request)?;
    if !api.node.raft().is_leader() {
        return api
            .node
            .forward_admin(request, |mut c, r| async move { c.remove_node(r).await })
            .await;
    }
    let req = request.into_inner();
    tracing::Span::current().record("node_id", req.node_id);
    let index = api
        .node
        .raft()
        .remove_node(req.node_id)
        .await
        .map_err(ApiError::from)?;
    Ok(Response::new(api.membership_reply(index)))
}

impl HeraldApi {
    fn membership_reply(&self, log_index: u64) -> pb::MembershipReply {
        let m = self.node.raft().metrics().borrow().membership_config.clone();
        let voters: BTreeSet<u64> = m.membership().voter_ids().collect();
        let learners = m.membership().learner_ids().collect();
        pb::MembershipReply {
            voters: voters.into_iter().collect(),
            learners,
            log_index,
        }
    }
}
