//! Dispatch, VerifyReplicas, ClusterStatus, AddNode and RemoveNode: where clients connect, and
//! the cluster's members.

use std::collections::BTreeSet;

use herald_proto::v1 as pb;
use herald_proto::v1::herald_client::HeraldClient;
use tonic::transport::Channel;
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
    let meta = api.node.groups().meta();
    let view = meta.cluster_view().await;
    let nodes = meta.reader().nodes().map_err(ApiError::from)?;
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
        shards: api.node.groups().shards(),
        groups: group_statuses(api),
    }))
}

/// Every Raft group as this node sees it, with each shard's preferred leader.
fn group_statuses(api: &HeraldApi) -> Vec<pb::GroupStatus> {
    let preferred = crate::balance::preferred_leaders(api.node.groups());
    api.node
        .groups()
        .all()
        .iter()
        .map(|g| {
            let m = g.metrics().borrow().clone();
            let membership = m.membership_config.membership();
            pb::GroupStatus {
                group: g.group(),
                leader_id: m.current_leader.unwrap_or(0),
                preferred_leader_id: preferred.get(&g.group()).copied().unwrap_or(0),
                term: m.current_term,
                applied_index: g.reader().applied_index(),
                voters: membership.voter_ids().collect(),
                learners: membership.learner_ids().collect(),
            }
        })
        .collect()
}

/// Metadata on a Rebalance one node sends the others: run it here only.
const LOCAL_METADATA: &str = "x-herald-local";

pub(super) async fn rebalance(
    api: &HeraldApi,
    request: Request<pb::RebalanceRequest>,
) -> Reply<pb::RebalanceReply> {
    auth::admin(&api.node, &request)?;
    let node = &api.node;
    if request.metadata().get(LOCAL_METADATA).is_some() {
        let stood = crate::balance::balance_once(node, &mut Default::default()).await;
        return Ok(Response::new(pb::RebalanceReply {
            spread: false,
            groups: Vec::new(),
            elections: stood.len() as u32,
        }));
    }
    let timeout = match request.into_inner().timeout_ms {
        0 => std::time::Duration::from_secs(10),
        ms => std::time::Duration::from_millis(ms.min(60_000)),
    };
    let deadline = std::time::Instant::now() + timeout;
    let me = node.config().id;
    let asks = node
        .groups()
        .meta()
        .member_ids()
        .into_iter()
        .map(|id| async move {
            if id == me {
                return crate::balance::balance_once(node, &mut Default::default())
                    .await
                    .len() as u32;
            }
            let Ok(channel) = node.peers().channel(id) else {
                return 0;
            };
            let mut call = Request::new(pb::RebalanceRequest::default());
            call.metadata_mut()
                .insert(LOCAL_METADATA, tonic::metadata::MetadataValue::from_static("1"));
            if let Some(token) = &node.config().admin_token {
                if let Ok(v) = format!("Bearer {token}").parse() {
                    call.metadata_mut().insert("authorization", v);
                }
            }
            match HeraldClient::new(channel).rebalance(call).await {
                Ok(r) => r.into_inner().elections,
                Err(s) => {
                    tracing::info!(node_id = id, error = %s, "rebalance: a node did not answer");
                    0
                }
            }
        });
    let elections = futures::future::join_all(asks).await.into_iter().sum();
    loop {
        let groups = group_statuses(api);
        let spread = groups
            .iter()
            .filter(|g| g.preferred_leader_id != 0)
            .all(|g| g.leader_id == g.preferred_leader_id);
        if spread || std::time::Instant::now() >= deadline {
            return Ok(Response::new(pb::RebalanceReply {
                spread,
                groups,
                elections,
            }));
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

pub(super) async fn add_node(
    api: &HeraldApi,
    request: Request<pb::AddNodeRequest>,
) -> Reply<pb::MembershipReply> {
    auth::admin(&api.node, &request)?;
    let group = match for_group(api, &request)? {
        Some(g) => g,
        None if !api.node.groups().meta().is_leader() => {
            return api
                .node
                .forward_admin(request, |mut c, r| async move { c.add_node(r).await })
                .await;
        }
        None => api.node.groups().meta().clone(),
    };
    let sharded = request.metadata().get(GROUP_METADATA).is_none() && api.node.groups().shards() > 0;
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
    // The metadata group first (its members are who the cluster plane lets in), then every
    // shard at its own leader.
    let index = group
        .add_node(req.node_id, req.cluster_addr.clone(), req.learner_only)
        .await
        .map_err(ApiError::from)?;
    if sharded {
        for shard in api.node.groups().data() {
            on_shard(
                api,
                shard,
                req.clone(),
                |mut c, r| async move { c.add_node(r).await },
                |g, r| async move { g.add_node(r.node_id, r.cluster_addr, r.learner_only).await },
            )
            .await?;
        }
    }
    Ok(Response::new(membership_reply(&group, index)))
}

pub(super) async fn remove_node(
    api: &HeraldApi,
    request: Request<pb::RemoveNodeRequest>,
) -> Reply<pb::MembershipReply> {
    auth::admin(&api.node, &request)?;
    let group = match for_group(api, &request)? {
        Some(g) => g,
        None if !api.node.groups().meta().is_leader() => {
            return api
                .node
                .forward_admin(request, |mut c, r| async move { c.remove_node(r).await })
                .await;
        }
        None => api.node.groups().meta().clone(),
    };
    let sharded = request.metadata().get(GROUP_METADATA).is_none() && api.node.groups().shards() > 0;
    let req = request.into_inner();
    tracing::Span::current().record("node_id", req.node_id);
    // Every shard first, at its own leader, then the metadata group (which keeps the node a
    // member of the cluster plane until its shard replicas are gone).
    if sharded {
        for shard in api.node.groups().data() {
            on_shard(
                api,
                shard,
                req,
                |mut c, r| async move { c.remove_node(r).await },
                |g, r| async move {
                    match g.remove_node(r.node_id).await {
                        // Already out of this shard (an earlier attempt): go on.
                        Err(herald_raft::raft_node::MembershipError::Refused(m))
                            if m.contains("is not a member") =>
                        {
                            Ok(0)
                        }
                        other => other,
                    }
                },
            )
            .await?;
        }
    }
    let index = group.remove_node(req.node_id).await.map_err(ApiError::from)?;
    Ok(Response::new(membership_reply(&group, index)))
}

/// Metadata on a membership change forwarded to one shard's leader: the group to change.
const GROUP_METADATA: &str = "x-herald-group";

/// The group a forwarded membership change names (this node must lead it), or None for a call
/// from a client (the whole cluster).
fn for_group<T>(api: &HeraldApi, request: &Request<T>) -> Result<Option<herald_raft::RaftNode>, ApiError> {
    let Some(v) = request.metadata().get(GROUP_METADATA) else {
        return Ok(None);
    };
    let group = v.to_str().ok().and_then(|v| v.parse::<u32>().ok());
    let Some(g) = group.and_then(|g| api.node.groups().get(g)) else {
        return Err(ApiError::InvalidArgument(format!(
            "{GROUP_METADATA}: no such raft group here"
        )));
    };
    if !g.is_leader() {
        return Err(ApiError::Unavailable {
            msg: format!("not the leader of raft group {} any more; retry", g.group()),
            leader: g.leader(),
        });
    }
    Ok(Some(g.clone()))
}

/// Runs a membership change on `shard`: here when this node leads it (`local`), else at its
/// leader (`remote`, over the cluster plane, naming the group). A shard without a leader, or whose
/// leader just changed, is retried for up to [`SHARD_CHANGE_WAIT`]: a change that stops half-way
/// leaves the node in some groups only (a retry of the call finishes it).
async fn on_shard<Req, Rep, R, RF, L, LF>(
    api: &HeraldApi,
    shard: &herald_raft::RaftNode,
    req: Req,
    remote: R,
    local: L,
) -> Result<(), tonic::Status>
where
    Req: Clone,
    R: Fn(HeraldClient<Channel>, Request<Req>) -> RF,
    RF: std::future::Future<Output = Result<Response<Rep>, tonic::Status>>,
    L: Fn(herald_raft::RaftNode, Req) -> LF,
    LF: std::future::Future<Output = Result<u64, herald_raft::raft_node::MembershipError>>,
{
    let deadline = std::time::Instant::now() + SHARD_CHANGE_WAIT;
    loop {
        let outcome: Result<(), tonic::Status> = match shard.leader() {
            Some((id, _)) if id == api.node.config().id => local(shard.clone(), req.clone())
                .await
                .map(|_| ())
                .map_err(|e| ApiError::from(e).into()),
            Some((id, addr)) => match shard.peer_channel(id) {
                Ok(channel) => {
                    let mut call = Request::new(req.clone());
                    call.metadata_mut().insert(GROUP_METADATA, shard.group().into());
                    if let Some(token) = &api.node.config().admin_token {
                        if let Ok(v) = format!("Bearer {token}").parse() {
                            call.metadata_mut().insert("authorization", v);
                        }
                    }
                    remote(HeraldClient::new(channel), call).await.map(|_| ())
                }
                Err(e) => Err(ApiError::Unavailable {
                    msg: format!(
                        "leader node {id} of raft group {} at {addr} unreachable: {e}",
                        shard.group()
                    ),
                    leader: Some((id, addr.clone())),
                }
                .into()),
            },
            None => Err(ApiError::Unavailable {
                msg: format!("raft group {} has no leader right now; retry", shard.group()),
                leader: None,
            }
            .into()),
        };
        match outcome {
            Err(s) if s.code() == tonic::Code::Unavailable && std::time::Instant::now() < deadline => {
                tracing::debug!(group = shard.group(), error = %s.message(), "membership change: shard not ready; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            other => return other,
        }
    }
}

/// How long a membership change waits for each shard's leader.
const SHARD_CHANGE_WAIT: std::time::Duration = std::time::Duration::from_secs(15);

fn membership_reply(raft: &herald_raft::RaftNode, log_index: u64) -> pb::MembershipReply {
    let m = raft.metrics().borrow().membership_config.clone();
    let voters: BTreeSet<u64> = m.membership().voter_ids().collect();
    let learners = m.membership().learner_ids().collect();
    pb::MembershipReply {
        voters: voters.into_iter().collect(),
        learners,
        log_index,
    }
}
