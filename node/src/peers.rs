//! What a node knows about the other members: reachability and load (probed every
//! [`PROBE_EVERY`]), used by Dispatch, redirects and — on each group's leader — to declare a member
//! down in that group.
//! Also the node-to-node `herald.peer.v1.Peer` service for online-only (QoS 0) delivery.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use herald_proto::peer::peer_client::PeerClient;
use herald_proto::peer::peer_server::{Peer, PeerServer};
use herald_proto::peer::{
    AppliedIndexReply, AppliedIndexRequest, DeliverReply, DeliverRequest, RatesReply, RatesRequest,
};
use herald_raft::{GroupId, Groups, NodeId, Op};
use parking_lot::RwLock;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

use crate::room::Room;

pub const PROBE_EVERY: Duration = Duration::from_secs(1);

/// One member's last known state.
#[derive(Debug, Clone)]
pub struct PeerState {
    pub reachable: bool,
    /// Last successful probe (or when monitoring started: a grace period).
    pub last_ok: Instant,
    pub connections: u64,
}

/// Reachability and load of every member, as this node sees them.
pub struct PeerMonitor {
    groups: Groups,
    room: Arc<Room>,
    node_down_timeout: Duration,
    states: RwLock<HashMap<NodeId, PeerState>>,
}

/// Longest a QoS-0 delivery to another node may take.
const PEER_CALL_TIMEOUT: Duration = Duration::from_secs(3);

impl PeerMonitor {
    pub fn new(groups: Groups, room: Arc<Room>, node_down_timeout: Duration) -> Arc<PeerMonitor> {
        Arc::new(PeerMonitor {
            groups,
            room,
            node_down_timeout,
            states: RwLock::new(HashMap::new()),
        })
    }

    pub fn state(&self, id: NodeId) -> Option<PeerState> {
        self.states.read().get(&id).cloned()
    }

    pub fn states(&self) -> HashMap<NodeId, PeerState> {
        self.states.read().clone()
    }

    /// A gRPC channel to member `node` on the cluster plane (mutual TLS unless
    /// `--insecure-cluster`); the connection its raft RPCs use.
    pub fn channel(&self, node: NodeId) -> Result<Channel, Status> {
        self.groups.meta().peer_channel(node).map_err(Status::unavailable)
    }

    /// Probes every member each second; in each group holding users that this node leads,
    /// declares members down that stayed unreachable past the timeout while holding sessions of
    /// that group.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut declared: HashMap<GroupId, HashSet<NodeId>> = HashMap::new();
        let mut leading: HashSet<GroupId> = HashSet::new();
        let mut tick = tokio::time::interval(PROBE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let now_leading: HashSet<GroupId> = self
                .groups
                .data()
                .iter()
                .filter(|g| g.is_leader())
                .map(|g| g.group())
                .collect();
            // A new leader of a group gives every member a fresh grace period.
            let fresh = now_leading.iter().any(|g| !leading.contains(g));
            self.observe(fresh).await;
            leading = now_leading;
            declared.retain(|g, _| leading.contains(g));
            let now = Instant::now();
            let me = self.groups.id();
            let down: Vec<NodeId> = self
                .states
                .read()
                .iter()
                .filter(|(id, s)| {
                    **id != me && !s.reachable && now.duration_since(s.last_ok) > self.node_down_timeout
                })
                .map(|(id, _)| *id)
                .collect();
            for group in &leading {
                let Some(raft) = self.groups.get(*group) else {
                    continue;
                };
                let done = declared.entry(*group).or_default();
                done.retain(|id| down.contains(id));
                for &id in &down {
                    if done.contains(&id) {
                        continue;
                    }
                    let holds = raft
                        .reader()
                        .sessions_on_node(id)
                        .map(|s| !s.is_empty())
                        .unwrap_or(false);
                    if !holds {
                        continue;
                    }
                    match raft.write_one(Op::NodeDown { node: id }).await {
                        Ok((r, idx)) => {
                            info!(node_id = id, group, log_index = idx, result = ?r, "member unreachable past the timeout: declared down");
                            done.insert(id);
                        }
                        Err(e) => warn!(node_id = id, group, error = %e, "could not declare member down"),
                    }
                }
            }
        }
    }

    /// Probes every member now: updates their states and the redirect list. `fresh_grace` (a new
    /// leader) restarts every member's grace period.
    async fn observe(&self, fresh_grace: bool) {
        self.groups.set_load(self.room.connections());
        let view = self.groups.meta().cluster_view().await;
        let now = Instant::now();
        {
            let mut st = self.states.write();
            st.retain(|id, _| view.members.iter().any(|m| m.node_id == *id));
            for m in &view.members {
                let e = st.entry(m.node_id).or_insert(PeerState {
                    reachable: m.reachable,
                    last_ok: now,
                    connections: 0,
                });
                e.reachable = m.reachable;
                if m.reachable {
                    e.last_ok = now;
                    e.connections = m.probe.as_ref().map(|p| p.connections).unwrap_or(0);
                }
            }
            if fresh_grace {
                for e in st.values_mut() {
                    e.last_ok = now;
                }
            }
        }
        self.refresh_redirects();
    }

    /// Probes the members once more (bounded by `limit`) so a drain right after start-up, before
    /// the first regular probe saw the peers, still hands its clients somewhere to go.
    pub async fn refresh_now(&self, limit: Duration) {
        if tokio::time::timeout(limit, self.observe(false)).await.is_err() {
            warn!("probing the members before the drain timed out; using the last known redirects");
        }
    }

    /// Client addresses of the other reachable members, fewest connections first.
    fn refresh_redirects(&self) {
        let nodes = self.groups.meta().reader().nodes().unwrap_or_default();
        let st = self.states.read();
        let mut others: Vec<(u64, String)> = nodes
            .into_iter()
            .filter(|n| n.id != self.groups.id() && !n.client_addr.is_empty())
            .filter_map(|n| {
                st.get(&n.id)
                    .filter(|s| s.reachable)
                    .map(|s| (s.connections, n.client_addr))
            })
            .collect();
        others.sort();
        self.room
            .set_redirects(others.into_iter().map(|(_, a)| a).collect());
    }

    /// Sends a QoS-0 message to the sessions `node` holds for the user; returns how many got it.
    pub async fn deliver_remote(&self, node: NodeId, req: DeliverRequest) -> Result<u32, Status> {
        let mut c = PeerClient::new(self.channel(node)?);
        let mut req = tonic::Request::new(req);
        req.set_timeout(PEER_CALL_TIMEOUT);
        match tokio::time::timeout(PEER_CALL_TIMEOUT, c.deliver(req)).await {
            Ok(reply) => Ok(reply?.into_inner().delivered),
            Err(_) => Err(Status::deadline_exceeded(format!(
                "peer delivery to node {node} timed out"
            ))),
        }
    }
}

/// The `herald.peer.v1.Peer` service: delivers QoS-0 messages to this node's sessions.
pub struct PeerService {
    room: Arc<Room>,
}

impl PeerService {
    pub fn server(room: Arc<Room>) -> PeerServer<PeerService> {
        PeerServer::new(PeerService { room })
    }
}

#[tonic::async_trait]
impl Peer for PeerService {
    async fn deliver(&self, request: Request<DeliverRequest>) -> Result<Response<DeliverReply>, Status> {
        let r = request.into_inner();
        // The receiver's own frame limit decides: nodes may run with different `--max-frame`, and
        // this node never sends a client a frame over its maximum (docs/PROTOCOL.md §1).
        let fits = self
            .room
            .config
            .max_frame
            .saturating_sub(herald_proto::frame::PUSH_HEADROOM);
        if r.payload.len() > fits {
            debug!(app = %r.app, size = r.payload.len(), fits, "qos0 from a peer does not fit in a frame here");
            return Err(Status::invalid_argument(format!(
                "payload of {} bytes does not fit in a client frame of node {}: its max frame leaves {fits} \
                 bytes for the payload",
                r.payload.len(),
                self.room.config.node_id
            )));
        }
        let delivered =
            self.room
                .deliver_direct(&r.app, &r.user, &r.devices, &r.msg_id, &r.payload, r.pushed_at_ms);
        debug!(app = %r.app, user = %r.user, delivered, "qos0 delivered for a peer");
        Ok(Response::new(DeliverReply { delivered }))
    }

    async fn applied_index(
        &self,
        request: Request<AppliedIndexRequest>,
    ) -> Result<Response<AppliedIndexReply>, Status> {
        let group = request.into_inner().group;
        let Some(raft) = self.room.groups.get(group) else {
            return Err(Status::not_found(format!("unknown raft group {group}")));
        };
        Ok(Response::new(AppliedIndexReply {
            node_id: raft.id(),
            leader: raft.is_leader(),
            applied_index: raft.reader().applied_index(),
        }))
    }

    async fn rates(&self, _request: Request<RatesRequest>) -> Result<Response<RatesReply>, Status> {
        Ok(Response::new(RatesReply {
            node_id: self.room.config.node_id,
            samples: self.room.stats.ops.samples(),
        }))
    }
}
