//! `herald.v1.Herald`: the public gRPC API served by every node.

pub mod auth;
pub mod error;
pub mod leader_hint;
pub mod verify;

use std::collections::BTreeSet;

use herald_proto::v1 as pb;
use herald_proto::v1::herald_server::Herald;
use herald_raft::{AppConfig, AppLimits, DevicePolicy, Enqueue, Op, OpResult, Publish, Target};
use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::node::Node;
use error::ApiError;

type Reply<T> = Result<Response<T>, Status>;
type ReplyStream<T> = std::pin::Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send>>;

/// Pushes of one PushStream running at once (and answers buffered for a slow reader).
const PUSH_STREAM_WINDOW: usize = 256;

/// The gRPC service; cheap to clone (shares the node).
#[derive(Clone)]
pub struct HeraldApi {
    node: Node,
}

impl HeraldApi {
    pub fn new(node: Node) -> Self {
        HeraldApi { node }
    }

    /// One push by an authenticated app (Push, and each push of a PushStream).
    async fn push_one(&self, app: AppConfig, mut req: pb::PushRequest) -> Result<pb::PushReply, Status> {
        same_app(&app, &req.app)?;
        let Ok(qos) = pb::Qos::try_from(req.qos) else {
            return Err(ApiError::InvalidArgument(format!(
                "qos {} is neither 0 (at most once) nor 1 (at least once)",
                req.qos
            ))
            .into());
        };
        if req.targets.is_empty() {
            return Err(ApiError::InvalidArgument("push needs at least one target".into()).into());
        }
        if req.targets.len() > app.limits.max_targets as usize {
            return Err(ApiError::InvalidArgument(format!(
                "{} targets exceed the app's limit of {} per push",
                req.targets.len(),
                app.limits.max_targets
            ))
            .into());
        }
        if req.targets.iter().any(|t| t.user.is_empty()) {
            return Err(ApiError::InvalidArgument("a target has an empty user".into()).into());
        }
        let max = crate::room::MAX_NAME;
        if req
            .targets
            .iter()
            .any(|t| t.user.len() > max || t.devices.iter().any(|d| d.is_empty() || d.len() > max))
        {
            return Err(
                ApiError::InvalidArgument(format!("users and devices must be 1 to {max} bytes")).into(),
            );
        }
        self.check_message(&app, req.payload.len(), &req.msg_id, &req.idempotency_key)?;
        req.targets = merge_targets(req.targets);
        let ops = &self.node.room().stats.ops;
        match qos {
            pb::Qos::AtMostOnce => ops.pushes_qos0.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            pb::Qos::AtLeastOnce => ops.pushes_qos1.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        };
        let msg_id = if req.msg_id.is_empty() {
            self.node.new_msg_id()
        } else {
            req.msg_id
        };
        if qos == pb::Qos::AtMostOnce {
            let (delivered, dropped) = self
                .push_online(&app.id, &msg_id, &req.targets, req.payload)
                .await;
            return Ok(pb::PushReply {
                msg_id,
                seqs: vec![],
                duplicate: false,
                delivered,
                dropped,
                log_index: 0,
            });
        }
        let op = Op::Enqueue(Enqueue {
            app: app.id.clone(),
            msg_id,
            targets: req
                .targets
                .into_iter()
                .map(|t| Target {
                    user: t.user,
                    devices: t.devices,
                })
                .collect(),
            payload: req.payload,
            ttl_ms: req.ttl_ms,
            idempotency_key: Some(req.idempotency_key).filter(|k| !k.is_empty()),
        });
        // BUG INJECTION (test-only cargo feature `bug-ack-before-commit`, for the jepsen suite):
        // answer the pusher as soon as the write is proposed, before it commits.
        #[cfg(feature = "bug-ack-before-commit")]
        {
            let msg_id = match &op {
                Op::Enqueue(e) => e.msg_id.clone(),
                _ => String::new(),
            };
            let raft = self.node.raft().clone();
            tokio::spawn(async move { raft.write_one(op).await });
            return Ok(pb::PushReply {
                msg_id,
                ..Default::default()
            });
        }
        #[allow(unreachable_code)]
        let (result, log_index) = self.node.raft().write_one(op).await.map_err(ApiError::from)?;
        match result {
            OpResult::Enqueued(e) => Ok(pb::PushReply {
                msg_id: e.msg_id,
                seqs: e
                    .seqs
                    .into_iter()
                    .map(|(user, seq)| pb::UserSeq { user, seq })
                    .collect(),
                duplicate: e.duplicate,
                delivered: 0,
                dropped: 0,
                log_index,
            }),
            OpResult::Rejected(r) => Err(ApiError::from(r).into()),
            other => Err(ApiError::Internal(format!("unexpected result {other:?}")).into()),
        }
    }

    /// Runs one PushStream: reads pushes, runs up to [`PUSH_STREAM_WINDOW`] at once, answers in
    /// request order. Ends when the client ends its side (after the last answer), when the client
    /// goes away (pushes already proposed still commit: their outcome is unknown to it), or at
    /// node shutdown (no new pushes; those running are answered).
    async fn serve_push_stream(
        self,
        mut inbound: tonic::Streaming<pb::PushRequest>,
        app_id: String,
        key: String,
        tx: tokio::sync::mpsc::Sender<Result<pb::PushStreamReply, Status>>,
    ) {
        use futures::stream::{FuturesOrdered, StreamExt};
        let mut running = FuturesOrdered::new();
        let mut reading = true;
        // A push the server could not decode ends the stream with this status once the pushes
        // before it are answered (tonic ends the reply stream at the first error sent).
        let mut undecodable: Option<Status> = None;
        let stop = self.node.cancel_token().clone();
        loop {
            tokio::select! {
                msg = inbound.message(), if reading && running.len() < PUSH_STREAM_WINDOW => match msg {
                    Ok(Some(req)) => {
                        let api = self.clone();
                        let (app_id, key) = (app_id.clone(), key.clone());
                        running.push_back(async move {
                            let app = auth::app_by_key(&api.node, &app_id, &key).await?;
                            api.push_one(app, req).await
                        });
                    }
                    Ok(None) => reading = false,
                    Err(status) => {
                        tracing::info!(app = %app_id, error = %status, "push stream broken by the client");
                        if status.code() == tonic::Code::InvalidArgument {
                            undecodable = Some(status);
                        }
                        reading = false;
                    }
                },
                Some(done) = running.next(), if !running.is_empty() => {
                    let reply = match done {
                        Ok(r) => pb::PushStreamReply { reply: Some(r), code: 0, message: String::new() },
                        Err(s) => pb::PushStreamReply {
                            reply: None,
                            code: s.code() as i32,
                            message: s.message().to_string(),
                        },
                    };
                    if tx.send(Ok(reply)).await.is_err() {
                        tracing::debug!(app = %app_id, "push stream client gone");
                        return;
                    }
                }
                _ = stop.cancelled(), if reading => reading = false,
            }
            if !reading && running.is_empty() {
                if let Some(status) = undecodable {
                    let _ = tx.send(Err(status)).await;
                }
                return;
            }
        }
    }
}

#[tonic::async_trait]
impl Herald for HeraldApi {
    #[instrument(skip_all, fields(app))]
    async fn push(&self, request: Request<pb::PushRequest>) -> Reply<pb::PushReply> {
        let app = auth::app_caller(&self.node, &request).await?;
        tracing::Span::current().record("app", app.id.as_str());
        Ok(Response::new(self.push_one(app, request.into_inner()).await?))
    }

    type PushStreamStream = ReplyStream<pb::PushStreamReply>;

    #[instrument(skip_all, fields(app))]
    async fn push_stream(
        &self,
        request: Request<tonic::Streaming<pb::PushRequest>>,
    ) -> Reply<Self::PushStreamStream> {
        let (app_id, key) = auth::app_credentials(&request)?;
        auth::app_by_key(&self.node, &app_id, &key).await?;
        tracing::Span::current().record("app", app_id.as_str());
        let (tx, rx) = tokio::sync::mpsc::channel(PUSH_STREAM_WINDOW);
        tokio::spawn(
            self.clone()
                .serve_push_stream(request.into_inner(), app_id, key, tx),
        );
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    #[instrument(skip_all, fields(app))]
    async fn broadcast(&self, request: Request<pb::BroadcastRequest>) -> Reply<pb::PublishReply> {
        let app = auth::app_caller(&self.node, &request).await?;
        let r = request.into_inner();
        same_app(&app, &r.app)?;
        self.publish(
            app,
            crate::room::BROADCAST.into(),
            r.payload,
            r.msg_id,
            r.idempotency_key,
        )
        .await
    }

    #[instrument(skip_all, fields(app))]
    async fn publish_topic(&self, request: Request<pb::PublishRequest>) -> Reply<pb::PublishReply> {
        let app = auth::app_caller(&self.node, &request).await?;
        let r = request.into_inner();
        same_app(&app, &r.app)?;
        if r.topic.is_empty() || r.topic.len() > crate::room::MAX_NAME {
            return Err(ApiError::InvalidArgument("topic must be 1 to 256 bytes".into()).into());
        }
        self.publish(app, r.topic, r.payload, r.msg_id, r.idempotency_key)
            .await
    }

    #[instrument(skip_all, fields(app))]
    async fn kick(&self, request: Request<pb::KickRequest>) -> Reply<pb::KickReply> {
        let app = auth::app_caller(&self.node, &request).await?;
        let r = request.into_inner();
        same_app(&app, &r.app)?;
        if r.user.is_empty() {
            return Err(ApiError::InvalidArgument("kick needs a user".into()).into());
        }
        let op = Op::Kick {
            app: app.id,
            user: r.user,
            device: Some(r.device).filter(|d| !d.is_empty()),
            reason: if r.reason.is_empty() {
                "kicked by the app".into()
            } else {
                r.reason
            },
        };
        let (result, _) = self.node.raft().write_one(op).await.map_err(ApiError::from)?;
        match result {
            OpResult::Dropped { sessions } => Ok(Response::new(pb::KickReply { kicked: sessions })),
            OpResult::Rejected(r) => Err(ApiError::from(r).into()),
            _ => Ok(Response::new(pb::KickReply { kicked: 0 })),
        }
    }

    async fn status(&self, request: Request<pb::StatusRequest>) -> Reply<pb::StatusReply> {
        let app = auth::app_caller(&self.node, &request).await?;
        let at = self.read_point(&request).await?;
        let md = request.metadata().clone();
        let r = request.into_inner();
        same_app(&app, &r.app)?;
        if let ReadAt::Leader(mut leader) = at {
            return leader.status(forwarded(&md, r)).await;
        }
        let reader = self.node.raft().reader();
        let sessions = reader.sessions(&app.id, &r.user).map_err(ApiError::from)?;
        let devices = reader.devices(&app.id, &r.user).map_err(ApiError::from)?;
        let meta = reader
            .mailbox_meta(&app.id, &r.user)
            .map_err(ApiError::from)?
            .unwrap_or_default();
        Ok(Response::new(pb::StatusReply {
            online: !sessions.is_empty(),
            sessions: sessions
                .into_iter()
                .map(|s| pb::SessionInfo {
                    device: s.device,
                    platform: s.platform,
                    node_id: s.node,
                    epoch: s.epoch,
                    since_ms: s.since_ms,
                })
                .collect(),
            pending: meta.count,
            next_seq: meta.next_seq.max(1),
            devices: devices
                .into_iter()
                .map(|(device, d)| pb::DeviceCursor {
                    device,
                    delivered: d.delivered,
                    acked: d.acked,
                })
                .collect(),
        }))
    }

    async fn delivery_status(
        &self,
        request: Request<pb::DeliveryStatusRequest>,
    ) -> Reply<pb::DeliveryStatusReply> {
        let app = auth::app_caller(&self.node, &request).await?;
        let at = self.read_point(&request).await?;
        let md = request.metadata().clone();
        let r = request.into_inner();
        same_app(&app, &r.app)?;
        if let ReadAt::Leader(mut leader) = at {
            return leader.delivery_status(forwarded(&md, r)).await;
        }
        let reader = self.node.raft().reader();
        let locations = reader.msg_locations(&app.id, &r.msg_id).map_err(ApiError::from)?;
        if locations.is_empty() {
            return Err(ApiError::NotFound(format!(
                "message {:?} is unknown, or its TTL has passed",
                r.msg_id
            ))
            .into());
        }
        let mut users = Vec::new();
        for (user, seq) in locations {
            let held = reader
                .mailbox_since(&app.id, &user, seq.saturating_sub(1), 1)
                .map_err(ApiError::from)?
                .into_iter()
                .find(|m| m.seq == seq);
            let meta = reader
                .mailbox_meta(&app.id, &user)
                .map_err(ApiError::from)?
                .unwrap_or_default();
            let devices = reader
                .devices(&app.id, &user)
                .map_err(ApiError::from)?
                .into_iter()
                .filter(|(d, state)| match &held {
                    Some(m) => m.devices.is_empty() || m.devices.contains(d),
                    // Gone but neither trimmed nor expired: every device it was for acked it,
                    // so a device that has not was not one of them.
                    None if seq > meta.trimmed_upto && seq > meta.expired_upto => state.acked >= seq,
                    None => true,
                })
                .map(|(device, d)| {
                    let state = if d.acked >= seq {
                        pb::DeliveryState::Acked
                    } else if held.is_none() && seq <= meta.trimmed_upto {
                        pb::DeliveryState::Trimmed
                    } else if held.is_none() && seq <= meta.expired_upto {
                        pb::DeliveryState::Expired
                    } else if d.delivered >= seq {
                        pb::DeliveryState::Delivered
                    } else {
                        pb::DeliveryState::Stored
                    };
                    pb::DeviceDelivery {
                        device,
                        state: state as i32,
                    }
                })
                .collect();
            users.push(pb::UserDelivery {
                user,
                seq,
                stored: held.is_some(),
                devices,
            });
        }
        Ok(Response::new(pb::DeliveryStatusReply {
            msg_id: r.msg_id,
            users,
        }))
    }

    async fn dispatch(&self, request: Request<pb::DispatchRequest>) -> Reply<pb::DispatchReply> {
        let r = request.into_inner();
        if r.user.is_empty() {
            return Err(ApiError::InvalidArgument("dispatch needs a user".into()).into());
        }
        let nodes = crate::dispatch::order(&self.node, &r.user, &r.transport).map_err(ApiError::from)?;
        let c = self.node.config();
        Ok(Response::new(pb::DispatchReply {
            nodes,
            heartbeat_ms: c.client_heartbeat.as_millis() as u32,
            heartbeat_min_ms: c.client_heartbeat_min.as_millis() as u32,
            heartbeat_max_ms: c.client_heartbeat_max.as_millis() as u32,
            backoff_initial_ms: crate::dispatch::BACKOFF_INITIAL_MS,
            backoff_max_ms: crate::dispatch::BACKOFF_MAX_MS,
        }))
    }

    #[instrument(skip_all)]
    async fn verify_replicas(
        &self,
        request: Request<pb::VerifyReplicasRequest>,
    ) -> Reply<pb::VerifyReplicasReply> {
        auth::admin(&self.node, &request)?;
        Ok(Response::new(
            verify::verify(&self.node, request.into_inner().timeout_ms).await,
        ))
    }

    #[instrument(skip_all)]
    async fn cluster_status(
        &self,
        _request: Request<pb::ClusterStatusRequest>,
    ) -> Reply<pb::ClusterStatusReply> {
        let view = self.node.raft().cluster_view().await;
        let nodes = self.node.raft().reader().nodes().map_err(ApiError::from)?;
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

    #[instrument(skip_all, fields(node_id))]
    async fn add_node(&self, request: Request<pb::AddNodeRequest>) -> Reply<pb::MembershipReply> {
        auth::admin(&self.node, &request)?;
        if !self.node.raft().is_leader() {
            return self
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
            return Err(ApiError::InvalidArgument(format!(
                "{:?} is not a host:port address",
                req.cluster_addr
            ))
            .into());
        }
        let index = self
            .node
            .raft()
            .add_node(req.node_id, req.cluster_addr, req.learner_only)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(self.membership_reply(index)))
    }

    #[instrument(skip_all, fields(node_id))]
    async fn remove_node(&self, request: Request<pb::RemoveNodeRequest>) -> Reply<pb::MembershipReply> {
        auth::admin(&self.node, &request)?;
        if !self.node.raft().is_leader() {
            return self
                .node
                .forward_admin(request, |mut c, r| async move { c.remove_node(r).await })
                .await;
        }
        let req = request.into_inner();
        tracing::Span::current().record("node_id", req.node_id);
        let index = self
            .node
            .raft()
            .remove_node(req.node_id)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(self.membership_reply(index)))
    }

    #[instrument(skip_all)]
    async fn create_app(&self, request: Request<pb::CreateAppRequest>) -> Reply<pb::AppReply> {
        auth::admin(&self.node, &request)?;
        let req = request.into_inner();
        validate_app_id(&req.id)?;
        // Read what every earlier admin write did before deciding the app is new.
        self.node.room().barrier.catch_up(self.node.raft()).await;
        if self
            .node
            .raft()
            .reader()
            .app(&req.id)
            .map_err(ApiError::from)?
            .is_some()
        {
            return Err(ApiError::AlreadyExists(format!("app {:?} already exists", req.id)).into());
        }
        let app = AppConfig {
            id: req.id.clone(),
            name: if req.name.is_empty() {
                req.id.clone()
            } else {
                req.name
            },
            secrets: vec![if req.secret.is_empty() {
                auth::random_secret()
            } else {
                req.secret
            }],
            api_keys: vec![if req.api_key.is_empty() {
                auth::random_secret()
            } else {
                req.api_key
            }],
            limits: req.limits.map(limits_from_pb).unwrap_or(AppLimits::STANDARD),
            policy: req.policy.map(policy_from_pb).unwrap_or(DevicePolicy {
                max_per_platform: 0,
                max_per_user: 0,
            }),
            callbacks: req.callbacks,
            created_ms: 0,
            client_publish: req.client_publish,
        };
        validate_app(&app)?;
        self.put_app(app).await
    }

    #[instrument(skip_all)]
    async fn update_app(&self, request: Request<pb::UpdateAppRequest>) -> Reply<pb::AppReply> {
        auth::admin(&self.node, &request)?;
        let Some(app) = request.into_inner().app else {
            return Err(ApiError::InvalidArgument("update needs an app".into()).into());
        };
        let Some(current) = self.app_after_catch_up(&app.id).await? else {
            return Err(ApiError::NotFound(format!("unknown app {:?}", app.id)).into());
        };
        let app = AppConfig {
            id: app.id,
            name: app.name,
            secrets: app.secrets,
            api_keys: app.api_keys,
            limits: app.limits.map(limits_from_pb).unwrap_or(current.limits),
            policy: app.policy.map(policy_from_pb).unwrap_or(current.policy),
            callbacks: app.callbacks,
            created_ms: current.created_ms,
            client_publish: app.client_publish,
        };
        validate_app(&app)?;
        self.put_app(app).await
    }

    async fn get_app(&self, request: Request<pb::GetAppRequest>) -> Reply<pb::AppReply> {
        auth::admin(&self.node, &request)?;
        let id = request.into_inner().id;
        match self.app_after_catch_up(&id).await? {
            Some(app) => Ok(Response::new(pb::AppReply {
                app: Some(app_to_pb(app)),
            })),
            None => Err(ApiError::NotFound(format!("unknown app {id:?}")).into()),
        }
    }

    async fn list_apps(&self, request: Request<pb::ListAppsRequest>) -> Reply<pb::ListAppsReply> {
        auth::admin(&self.node, &request)?;
        self.node.room().barrier.catch_up(self.node.raft()).await;
        let apps = self.node.raft().reader().apps().map_err(ApiError::from)?;
        Ok(Response::new(pb::ListAppsReply {
            apps: apps.into_iter().map(app_to_pb).collect(),
        }))
    }

    #[instrument(skip_all)]
    async fn delete_app(&self, request: Request<pb::DeleteAppRequest>) -> Reply<pb::DeleteAppReply> {
        auth::admin(&self.node, &request)?;
        let id = request.into_inner().id;
        let (result, _) = self
            .node
            .raft()
            .write_one(Op::DeleteApp { app: id })
            .await
            .map_err(ApiError::from)?;
        match result {
            OpResult::Rejected(r) => Err(ApiError::from(r).into()),
            _ => Ok(Response::new(pb::DeleteAppReply {})),
        }
    }
}

/// Metadata on a read another node forwarded here: it is answered here or refused, never
/// forwarded again.
const FORWARDED_METADATA: &str = "x-herald-forwarded";
/// How long a linearizable read waits for the leader to confirm its leadership.
const READ_BARRIER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// Where a linearizable read is answered.
enum ReadAt {
    /// Here: this node is the leader, confirmed by a quorum, and has applied everything
    /// committed before the read began.
    Here,
    /// At the leader, through its own API.
    Leader(herald_proto::v1::herald_client::HeraldClient<tonic::transport::Channel>),
}

/// The same call for the leader, with the caller's credentials.
fn forwarded<M>(md: &tonic::metadata::MetadataMap, msg: M) -> Request<M> {
    let mut r = Request::new(msg);
    for key in [auth::APP_METADATA, auth::API_KEY_METADATA] {
        if let Some(v) = md.get(key) {
            r.metadata_mut().insert(key, v.clone());
        }
    }
    r.metadata_mut().insert(
        FORWARDED_METADATA,
        tonic::metadata::MetadataValue::from_static("1"),
    );
    r.set_timeout(READ_BARRIER_TIMEOUT * 2);
    r
}

impl HeraldApi {
    /// Status and DeliveryStatus are linearizable: a read never returns state older than a write
    /// (Register, Kick, Enqueue, Ack) that completed before the read began. The leader answers
    /// after `ensure_linearizable` (a heartbeat round confirms it is still leader; it waits until
    /// its state machine applied the commit index seen at the start); a follower forwards the
    /// call to the leader once. A follower's local state machine may lag, so it is never read
    /// for these answers.
    async fn read_point<T>(&self, req: &Request<T>) -> Result<ReadAt, ApiError> {
        let raft = self.node.raft();
        match raft.leader() {
            Some((id, _)) if id == self.node.config().id => {
                let unavailable = |msg: String| ApiError::Unavailable { msg, leader: None };
                match tokio::time::timeout(READ_BARRIER_TIMEOUT, raft.raft().ensure_linearizable()).await {
                    Ok(Ok(_)) => Ok(ReadAt::Here),
                    Ok(Err(e)) => Err(unavailable(format!(
                        "cannot serve a linearizable read here: {e}; retry"
                    ))),
                    Err(_) => Err(unavailable(
                        "the leader could not confirm its leadership in time; retry".into(),
                    )),
                }
            }
            Some((id, addr)) if req.metadata().get(FORWARDED_METADATA).is_none() => {
                let channel = self.node.peers().channel(id).map_err(|s| ApiError::Unavailable {
                    msg: format!("cannot reach the leader for a linearizable read: {}", s.message()),
                    leader: Some((id, addr.clone())),
                })?;
                Ok(ReadAt::Leader(
                    herald_proto::v1::herald_client::HeraldClient::new(channel),
                ))
            }
            leader => Err(ApiError::Unavailable {
                msg: "no leader to serve a linearizable read; retry".into(),
                leader,
            }),
        }
    }

    /// What every message must satisfy before it is proposed: the app's payload limit, and a
    /// size that fits in one client frame of this node (docs/PROTOCOL.md: the server never sends
    /// a frame over its maximum; a message that could not be delivered is refused here, not
    /// stored). Ids and keys are bounded like every other name.
    fn check_message(
        &self,
        app: &AppConfig,
        payload: usize,
        msg_id: &str,
        idempotency_key: &str,
    ) -> Result<(), ApiError> {
        if payload > app.limits.max_payload as usize {
            return Err(ApiError::InvalidArgument(format!(
                "payload of {payload} bytes exceeds the app's limit of {}",
                app.limits.max_payload
            )));
        }
        let fits = self
            .node
            .config()
            .max_frame
            .saturating_sub(herald_proto::frame::PUSH_HEADROOM);
        if payload > fits {
            return Err(ApiError::InvalidArgument(format!(
                "payload of {payload} bytes does not fit in a client frame: this node's max frame \
                 leaves {fits} bytes for the payload"
            )));
        }
        let max = crate::room::MAX_NAME;
        if msg_id.len() > max || idempotency_key.len() > max {
            return Err(ApiError::InvalidArgument(format!(
                "msg id and idempotency key must be at most {max} bytes"
            )));
        }
        Ok(())
    }

    async fn publish(
        &self,
        app: AppConfig,
        topic: String,
        payload: bytes::Bytes,
        msg_id: String,
        idempotency_key: String,
    ) -> Reply<pb::PublishReply> {
        self.check_message(&app, payload.len(), &msg_id, &idempotency_key)?;
        self.node
            .room()
            .stats
            .ops
            .publishes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let msg_id = if msg_id.is_empty() {
            self.node.new_msg_id()
        } else {
            msg_id
        };
        let op = Op::Publish(Publish {
            app: app.id,
            topic,
            msg_id,
            payload,
            idempotency_key: Some(idempotency_key).filter(|k| !k.is_empty()),
        });
        let (result, log_index) = self.node.raft().write_one(op).await.map_err(ApiError::from)?;
        match result {
            OpResult::Published(p) => Ok(Response::new(pb::PublishReply {
                msg_id: p.msg_id,
                topic: p.topic,
                seq: p.seq,
                duplicate: p.duplicate,
                log_index,
            })),
            OpResult::Rejected(r) => Err(ApiError::from(r).into()),
            other => Err(ApiError::Internal(format!("unexpected result {other:?}")).into()),
        }
    }

    /// QoS 0: deliver to whoever is online now (this node directly, others through the peer
    /// service); nothing is stored. Returns (devices reached, targets dropped).
    async fn push_online(
        &self,
        app: &str,
        msg_id: &str,
        targets: &[pb::Target],
        payload: bytes::Bytes,
    ) -> (u32, u32) {
        let me = self.node.config().id;
        let at = herald_raft::raft_node::now_ms();
        let (mut delivered, mut dropped) = (0u32, 0u32);
        let holders = |t: &pb::Target| {
            let sessions = self
                .node
                .raft()
                .reader()
                .sessions(app, &t.user)
                .unwrap_or_default();
            let mut nodes: Vec<u64> = sessions
                .iter()
                .filter(|s| t.devices.is_empty() || t.devices.contains(&s.device))
                .map(|s| s.node)
                .collect();
            nodes.sort_unstable();
            nodes.dedup();
            nodes
        };
        let mut routes: Vec<Vec<u64>> = targets.iter().map(holders).collect();
        // A target that looks offline here may have logged in (WELCOME sent) on another node
        // whose registration this node has not applied yet: catch up with the leader once, then
        // look again (read-your-writes, ARCHITECTURE.md).
        if routes.iter().any(Vec::is_empty) && self.node.room().barrier.catch_up(self.node.raft()).await {
            for (t, nodes) in targets.iter().zip(routes.iter_mut()) {
                if nodes.is_empty() {
                    *nodes = holders(t);
                }
            }
        }
        for (t, nodes) in targets.iter().zip(routes) {
            let mut got = 0;
            for n in nodes {
                if n == me {
                    got += self
                        .node
                        .room()
                        .deliver_direct(app, &t.user, &t.devices, msg_id, &payload, at);
                } else {
                    let req = herald_proto::peer::DeliverRequest {
                        from: me,
                        app: app.into(),
                        user: t.user.clone(),
                        devices: t.devices.clone(),
                        msg_id: msg_id.into(),
                        payload: payload.clone(),
                        pushed_at_ms: at,
                    };
                    match self.node.peers().deliver_remote(n, req).await {
                        Ok(d) => got += d,
                        Err(e) => tracing::debug!(node = n, error = %e, "qos0 peer delivery failed"),
                    }
                }
            }
            delivered += got;
            if got == 0 {
                dropped += 1;
            }
        }
        self.node
            .room()
            .stats
            .qos0_dropped
            .fetch_add(dropped as u64, std::sync::atomic::Ordering::Relaxed);
        (delivered, dropped)
    }

    /// App `id` from this node's state, after catching up with the leader if it is not there
    /// (read-your-writes: an app created through another node is found).
    async fn app_after_catch_up(&self, id: &str) -> Result<Option<AppConfig>, ApiError> {
        let reader = self.node.raft().reader();
        if let Some(app) = reader.app(id)? {
            return Ok(Some(app));
        }
        if !self.node.room().barrier.catch_up(self.node.raft()).await {
            return Ok(None);
        }
        Ok(reader.app(id)?)
    }

    async fn put_app(&self, app: AppConfig) -> Reply<pb::AppReply> {
        let id = app.id.clone();
        let (result, index) = self
            .node
            .raft()
            .write_one(Op::PutApp(app))
            .await
            .map_err(ApiError::from)?;
        if let OpResult::Rejected(r) = result {
            return Err(ApiError::from(r).into());
        }
        // Read our own write: wait until this node applied it, then answer from the state.
        self.node.raft().reader().wait_applied(index).await;
        match self.node.raft().reader().app(&id).map_err(ApiError::from)? {
            Some(app) => Ok(Response::new(pb::AppReply {
                app: Some(app_to_pb(app)),
            })),
            None => Err(ApiError::Internal(format!("app {id:?} missing after commit")).into()),
        }
    }

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

/// One target per user, in first-seen order: a user listed more than once gets the message once,
/// for every device (if any entry asked for every device) or for the union of the devices listed.
fn merge_targets(targets: Vec<pb::Target>) -> Vec<pb::Target> {
    let mut out: Vec<pb::Target> = Vec::with_capacity(targets.len());
    let mut at: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for t in targets {
        let Some(&i) = at.get(&t.user) else {
            at.insert(t.user.clone(), out.len());
            let mut first = t;
            dedup_in_order(&mut first.devices);
            out.push(first);
            continue;
        };
        let merged = &mut out[i];
        if merged.devices.is_empty() || t.devices.is_empty() {
            merged.devices.clear();
        } else {
            merged.devices.extend(t.devices);
            dedup_in_order(&mut merged.devices);
        }
    }
    out
}

fn dedup_in_order(v: &mut Vec<String>) {
    let mut seen = std::collections::HashSet::new();
    v.retain(|d| seen.insert(d.clone()));
}

fn same_app(app: &AppConfig, requested: &str) -> Result<(), ApiError> {
    if requested != app.id {
        return Err(ApiError::PermissionDenied(format!(
            "this API key belongs to app {:?}, not {:?}",
            app.id, requested
        )));
    }
    Ok(())
}

fn validate_app_id(id: &str) -> Result<(), ApiError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if ok {
        Ok(())
    } else {
        Err(ApiError::InvalidArgument(format!(
            "app id {id:?} must be 1-64 characters of letters, digits, '-', '_' or '.'"
        )))
    }
}

fn validate_app(app: &AppConfig) -> Result<(), ApiError> {
    validate_app_id(&app.id)?;
    if app.secrets.is_empty() || app.secrets.iter().any(|s| s.len() < 16) {
        return Err(ApiError::InvalidArgument(
            "an app needs token secrets of at least 16 characters".into(),
        ));
    }
    if app.api_keys.is_empty() || app.api_keys.iter().any(|s| s.len() < 16) {
        return Err(ApiError::InvalidArgument(
            "an app needs API keys of at least 16 characters".into(),
        ));
    }
    let l = &app.limits;
    if l.mailbox_cap == 0
        || l.topic_retain == 0
        || l.max_payload == 0
        || l.default_ttl_ms == 0
        || l.max_targets == 0
    {
        return Err(ApiError::InvalidArgument(
            "app limits must be greater than 0".into(),
        ));
    }
    if l.default_ttl_ms > l.max_ttl_ms {
        return Err(ApiError::InvalidArgument(
            "default_ttl_ms exceeds max_ttl_ms".into(),
        ));
    }
    for f in &app.client_publish {
        if f.len() > 256 || f.starts_with('$') || f == "*" {
            return Err(ApiError::InvalidArgument(format!(
                "client_publish entry {f:?}: a topic name or filter of at most 256 bytes, not `*` and not starting with `$`"
            )));
        }
        herald_mqtt::topic::validate_filter(f)
            .map_err(|e| ApiError::InvalidArgument(format!("client_publish entry {f:?}: {e}")))?;
    }
    Ok(())
}

fn limits_from_pb(l: pb::AppLimits) -> AppLimits {
    let d = AppLimits::STANDARD;
    let or = |v: u64, d: u64| if v == 0 { d } else { v };
    AppLimits {
        mailbox_cap: or(l.mailbox_cap.into(), d.mailbox_cap.into()) as u32,
        default_ttl_ms: or(l.default_ttl_ms, d.default_ttl_ms),
        max_ttl_ms: or(l.max_ttl_ms, d.max_ttl_ms),
        topic_retain: or(l.topic_retain.into(), d.topic_retain.into()) as u32,
        max_payload: or(l.max_payload.into(), d.max_payload.into()) as u32,
        max_targets: or(l.max_targets.into(), d.max_targets.into()) as u32,
    }
}

fn policy_from_pb(p: pb::DevicePolicy) -> DevicePolicy {
    DevicePolicy {
        max_per_platform: p.max_per_platform,
        max_per_user: p.max_per_user,
    }
}

fn app_to_pb(a: AppConfig) -> pb::App {
    pb::App {
        id: a.id,
        name: a.name,
        secrets: a.secrets,
        api_keys: a.api_keys,
        limits: Some(pb::AppLimits {
            mailbox_cap: a.limits.mailbox_cap,
            default_ttl_ms: a.limits.default_ttl_ms,
            max_ttl_ms: a.limits.max_ttl_ms,
            topic_retain: a.limits.topic_retain,
            max_payload: a.limits.max_payload,
            max_targets: a.limits.max_targets,
        }),
        policy: Some(pb::DevicePolicy {
            max_per_platform: a.policy.max_per_platform,
            max_per_user: a.policy.max_per_user,
        }),
        callbacks: a.callbacks,
        created_ms: a.created_ms,
        client_publish: a.client_publish,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(user: &str, devices: &[&str]) -> pb::Target {
        pb::Target {
            user: user.into(),
            devices: devices.iter().map(|d| d.to_string()).collect(),
        }
    }

    #[test]
    fn a_user_listed_twice_is_one_target_for_the_union_of_its_devices() {
        let merged = merge_targets(vec![
            t("a", &["phone", "phone"]),
            t("b", &["x"]),
            t("a", &["tablet", "phone"]),
            t("c", &["y"]),
            t("b", &[]),
            t("c", &["y"]),
        ]);
        assert_eq!(
            merged,
            vec![t("a", &["phone", "tablet"]), t("b", &[]), t("c", &["y"])],
            "first-seen order; every device wins over a list"
        );
        assert_eq!(
            merge_targets(vec![t("a", &[]), t("a", &["phone"])]),
            vec![t("a", &[])]
        );
    }
}
