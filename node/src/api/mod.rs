//! `herald.v1.Herald`: the public gRPC API served by every node.
//!
//! One file per group of RPCs: `push.rs` (Push, PushStream), `topics.rs` (PublishTopic,
//! Broadcast), `sessions.rs` (Kick, Status, DeliveryStatus), `cluster.rs` (Dispatch,
//! VerifyReplicas, ClusterStatus, AddNode, RemoveNode) and `apps.rs` (the app admin calls). Each
//! RPC `foo` of the trait below is `<file>::foo`; this file holds the service and what several
//! groups share.

mod apps;
pub mod auth;
mod cluster;
pub mod error;
pub mod leader_hint;
mod push;
mod sessions;
mod topics;
pub mod verify;

use herald_proto::v1 as pb;
use herald_proto::v1::herald_server::Herald;
use herald_raft::AppConfig;
use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::node::Node;
use error::ApiError;

type Reply<T> = Result<Response<T>, Status>;
type ReplyStream<T> = std::pin::Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send>>;

/// The gRPC service; cheap to clone (shares the node).
#[derive(Clone)]
pub struct HeraldApi {
    node: Node,
}

impl HeraldApi {
    pub fn new(node: Node) -> Self {
        HeraldApi { node }
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
}

#[tonic::async_trait]
impl Herald for HeraldApi {
    #[instrument(skip_all, fields(app))]
    async fn push(&self, request: Request<pb::PushRequest>) -> Reply<pb::PushReply> {
        push::push(self, request).await
    }

    type PushStreamStream = ReplyStream<pb::PushStreamReply>;

    #[instrument(skip_all, fields(app))]
    async fn push_stream(
        &self,
        request: Request<tonic::Streaming<pb::PushRequest>>,
    ) -> Reply<Self::PushStreamStream> {
        push::push_stream(self, request).await
    }

    #[instrument(skip_all, fields(app))]
    async fn broadcast(&self, request: Request<pb::BroadcastRequest>) -> Reply<pb::PublishReply> {
        topics::broadcast(self, request).await
    }

    #[instrument(skip_all, fields(app))]
    async fn publish_topic(&self, request: Request<pb::PublishRequest>) -> Reply<pb::PublishReply> {
        topics::publish_topic(self, request).await
    }

    #[instrument(skip_all, fields(app))]
    async fn kick(&self, request: Request<pb::KickRequest>) -> Reply<pb::KickReply> {
        sessions::kick(self, request).await
    }

    async fn status(&self, request: Request<pb::StatusRequest>) -> Reply<pb::StatusReply> {
        sessions::status(self, request).await
    }

    async fn delivery_status(
        &self,
        request: Request<pb::DeliveryStatusRequest>,
    ) -> Reply<pb::DeliveryStatusReply> {
        sessions::delivery_status(self, request).await
    }

    async fn dispatch(&self, request: Request<pb::DispatchRequest>) -> Reply<pb::DispatchReply> {
        cluster::dispatch(self, request).await
    }

    #[instrument(skip_all)]
    async fn verify_replicas(
        &self,
        request: Request<pb::VerifyReplicasRequest>,
    ) -> Reply<pb::VerifyReplicasReply> {
        cluster::verify_replicas(self, request).await
    }

    #[instrument(skip_all)]
    async fn cluster_status(
        &self,
        _request: Request<pb::ClusterStatusRequest>,
    ) -> Reply<pb::ClusterStatusReply> {
        cluster::cluster_status(self).await
    }

    #[instrument(skip_all, fields(node_id))]
    async fn add_node(&self, request: Request<pb::AddNodeRequest>) -> Reply<pb::MembershipReply> {
        cluster::add_node(self, request).await
    }

    #[instrument(skip_all, fields(node_id))]
    async fn remove_node(&self, request: Request<pb::RemoveNodeRequest>) -> Reply<pb::MembershipReply> {
        cluster::remove_node(self, request).await
    }

    #[instrument(skip_all)]
    async fn rebalance(&self, request: Request<pb::RebalanceRequest>) -> Reply<pb::RebalanceReply> {
        cluster::rebalance(self, request).await
    }

    #[instrument(skip_all)]
    async fn create_app(&self, request: Request<pb::CreateAppRequest>) -> Reply<pb::AppReply> {
        apps::create_app(self, request).await
    }

    #[instrument(skip_all)]
    async fn update_app(&self, request: Request<pb::UpdateAppRequest>) -> Reply<pb::AppReply> {
        apps::update_app(self, request).await
    }

    async fn get_app(&self, request: Request<pb::GetAppRequest>) -> Reply<pb::AppReply> {
        apps::get_app(self, request).await
    }

    async fn list_apps(&self, request: Request<pb::ListAppsRequest>) -> Reply<pb::ListAppsReply> {
        apps::list_apps(self, request).await
    }

    #[instrument(skip_all)]
    async fn delete_app(&self, request: Request<pb::DeleteAppRequest>) -> Reply<pb::DeleteAppReply> {
        apps::delete_app(self, request).await
    }
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
