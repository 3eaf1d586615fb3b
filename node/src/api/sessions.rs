//! Kick, Status and DeliveryStatus: a user's sessions, devices and messages as the registry
//! holds them. Status and DeliveryStatus are linearizable reads, answered by the leader.

use herald_proto::v1 as pb;
use herald_proto::v1::herald_client::HeraldClient;
use herald_raft::{AppConfig, Op, OpResult, RaftNode, StateReader};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use super::error::ApiError;
use super::{auth, same_app, HeraldApi, Reply};

pub(super) async fn kick(api: &HeraldApi, request: Request<pb::KickRequest>) -> Reply<pb::KickReply> {
    let app = auth::app_caller(&api.node, &request).await?;
    let r = request.into_inner();
    same_app(&app, &r.app)?;
    if r.user.is_empty() {
        return Err(ApiError::InvalidArgument("kick needs a user".into()).into());
    }
    let group = api.node.groups().of_user(&app.id, &r.user).clone();
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
    let (result, _) = group.write_one(op).await.map_err(ApiError::from)?;
    match result {
        OpResult::Dropped { sessions } => Ok(Response::new(pb::KickReply { kicked: sessions })),
        OpResult::Rejected(r) => Err(ApiError::from(r).into()),
        _ => Ok(Response::new(pb::KickReply { kicked: 0 })),
    }
}

pub(super) async fn status(api: &HeraldApi, request: Request<pb::StatusRequest>) -> Reply<pb::StatusReply> {
    let app = auth::app_caller(&api.node, &request).await?;
    let group = api
        .node
        .groups()
        .of_user(&app.id, &request.get_ref().user)
        .clone();
    let (app, r) = match begin_read(api, app, &group, request, |r| &r.app).await? {
        Read::Here(app, r) => (app, r),
        Read::Leader(mut leader, call) => return leader.status(call).await,
    };
    let reader = group.reader();
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

/// DeliveryStatus: a message's users may be in any shard, so each group holding users is read
/// (linearizably, at its leader) and the answers are merged. A call forwarded for one group
/// ([`GROUP_METADATA`]) answers that group's part only.
pub(super) async fn delivery_status(
    api: &HeraldApi,
    request: Request<pb::DeliveryStatusRequest>,
) -> Reply<pb::DeliveryStatusReply> {
    let app = auth::app_caller(&api.node, &request).await?;
    let groups = api.node.groups().clone();
    let asked_for = match request.metadata().get(GROUP_METADATA) {
        None => None,
        Some(v) => {
            let g = v.to_str().ok().and_then(|v| v.parse().ok());
            match g.and_then(|g| groups.get(g)) {
                Some(g) => Some(g.clone()),
                None => {
                    return Err(ApiError::InvalidArgument(format!(
                        "{GROUP_METADATA}: no such raft group here"
                    ))
                    .into())
                }
            }
        }
    };
    let parts: Vec<RaftNode> = match asked_for {
        Some(g) => vec![g],
        None => groups.data().to_vec(),
    };
    let md = request.metadata().clone();
    let r = request.into_inner();
    same_app(&app, &r.app)?;
    let sharded = groups.shards() > 0;
    let reads = parts.iter().map(|g| {
        let call = with_metadata(&md, r.clone());
        let app = app.clone();
        async move {
            match begin_read(api, app, g, call, |r| &r.app).await? {
                Read::Here(app, r) => delivery_part(g.reader(), &app.id, &r.msg_id),
                Read::Leader(mut leader, mut call) => {
                    if sharded {
                        call.metadata_mut().insert(GROUP_METADATA, g.group().into());
                    }
                    match leader.delivery_status(call).await {
                        Ok(reply) => Ok(reply.into_inner().users),
                        // The leader's part has no such message.
                        Err(s) if s.code() == tonic::Code::NotFound => Ok(Vec::new()),
                        Err(s) => Err(s),
                    }
                }
            }
        }
    });
    let mut users = Vec::new();
    for part in futures::future::join_all(reads).await {
        users.extend(part?);
    }
    if users.is_empty() {
        return Err(ApiError::NotFound(format!(
            "message {:?} is unknown, or its TTL has passed",
            r.msg_id
        ))
        .into());
    }
    Ok(Response::new(pb::DeliveryStatusReply {
        msg_id: r.msg_id,
        users,
    }))
}

/// Where message `msg_id` of `app` is held in one group, per user and device.
fn delivery_part(reader: &StateReader, app: &str, msg_id: &str) -> Result<Vec<pb::UserDelivery>, Status> {
    let locations = reader.msg_locations(app, msg_id).map_err(ApiError::from)?;
    let mut users = Vec::new();
    for (user, seq) in locations {
        let held = reader
            .mailbox_since(app, &user, seq.saturating_sub(1), 1)
            .map_err(ApiError::from)?
            .into_iter()
            .find(|m| m.seq == seq);
        let meta = reader
            .mailbox_meta(app, &user)
            .map_err(ApiError::from)?
            .unwrap_or_default();
        let devices = reader
            .devices(app, &user)
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
    Ok(users)
}

/// Metadata on a DeliveryStatus forwarded to one group's leader: the Raft group whose part it
/// asks for (a node of a sharded cluster asks every shard's leader).
const GROUP_METADATA: &str = "x-herald-group";
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
    Leader(HeraldClient<Channel>),
}

/// A linearizable read (Status, DeliveryStatus), begun: the caller's app and request when this
/// node answers it, or the leader and the call to send it.
enum Read<T> {
    Here(AppConfig, T),
    Leader(HeraldClient<Channel>, Request<T>),
}

/// For the authenticated `app`'s linearizable read in Raft `group`: checks it asks about its own
/// app (`app_of`) and finds where the read is answered.
async fn begin_read<T>(
    api: &HeraldApi,
    app: AppConfig,
    group: &RaftNode,
    request: Request<T>,
    app_of: fn(&T) -> &str,
) -> Result<Read<T>, Status> {
    let at = api.read_point(group, &request).await?;
    let md = request.metadata().clone();
    let r = request.into_inner();
    same_app(&app, app_of(&r))?;
    Ok(match at {
        ReadAt::Here => Read::Here(app, r),
        ReadAt::Leader(leader) => Read::Leader(leader, forwarded(&md, r)),
    })
}

/// The call with the caller's metadata (credentials, the forwarded and group marks).
fn with_metadata<M>(md: &tonic::metadata::MetadataMap, msg: M) -> Request<M> {
    let mut r = Request::new(msg);
    *r.metadata_mut() = md.clone();
    r
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
    async fn read_point<T>(&self, raft: &RaftNode, req: &Request<T>) -> Result<ReadAt, ApiError> {
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
                Ok(ReadAt::Leader(HeraldClient::new(channel)))
            }
            leader => Err(ApiError::Unavailable {
                msg: "no leader to serve a linearizable read; retry".into(),
                leader,
            }),
        }
    }
}
