//! PublishTopic and Broadcast: one message to a topic's log (Broadcast: the app's broadcast
//! topic), which subscribers read from their node.

use herald_proto::v1 as pb;
use herald_raft::{AppConfig, Op, OpResult, Publish};
use tonic::{Request, Response};

use super::error::ApiError;
use super::{auth, same_app, HeraldApi, Reply};

pub(super) async fn broadcast(
    api: &HeraldApi,
    request: Request<pb::BroadcastRequest>,
) -> Reply<pb::PublishReply> {
    let app = auth::app_caller(&api.node, &request).await?;
    let r = request.into_inner();
    same_app(&app, &r.app)?;
    api.publish(
        app,
        crate::room::BROADCAST.into(),
        r.payload,
        r.msg_id,
        r.idempotency_key,
    )
    .await
}

pub(super) async fn publish_topic(
    api: &HeraldApi,
    request: Request<pb::PublishRequest>,
) -> Reply<pb::PublishReply> {
    let app = auth::app_caller(&api.node, &request).await?;
    let r = request.into_inner();
    same_app(&app, &r.app)?;
    if r.topic.is_empty() || r.topic.len() > crate::room::MAX_NAME {
        return Err(ApiError::InvalidArgument("topic must be 1 to 256 bytes".into()).into());
    }
    api.publish(app, r.topic, r.payload, r.msg_id, r.idempotency_key)
        .await
}

impl HeraldApi {
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
        // The topic's home: a shard chosen by (app, topic), the one group without shards.
        let group = self.node.groups().of_topic(&app.id, &topic).clone();
        let op = Op::Publish(Publish {
            app: app.id,
            topic,
            msg_id,
            payload,
            idempotency_key: Some(idempotency_key).filter(|k| !k.is_empty()),
        });
        let (result, log_index) = group.write_one(op).await.map_err(ApiError::from)?;
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
}
