//! CreateApp, UpdateApp, GetApp, ListApps and DeleteApp: the admin calls on apps, their
//! validation, and the conversions between an app and its protobuf form.

use herald_proto::v1 as pb;
use herald_raft::{AppConfig, AppLimits, DevicePolicy, Op, OpResult};
use tonic::{Request, Response};

use super::error::ApiError;
use super::{auth, HeraldApi, Reply};

pub(super) async fn create_app(
    api: &HeraldApi,
    request: Request<pb::CreateAppRequest>,
) -> Reply<pb::AppReply> {
    auth::admin(&api.node, &request)?;
    let req = request.into_inner();
    validate_app_id(&req.id)?;
    // Read what every earlier admin write did before deciding the app is new.
    let meta = api.node.groups().meta();
    api.node.room().barrier.catch_up(meta).await;
    if meta.reader().app(&req.id).map_err(ApiError::from)?.is_some() {
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
    api.put_app(app).await
}

pub(super) async fn update_app(
    api: &HeraldApi,
    request: Request<pb::UpdateAppRequest>,
) -> Reply<pb::AppReply> {
    auth::admin(&api.node, &request)?;
    let Some(app) = request.into_inner().app else {
        return Err(ApiError::InvalidArgument("update needs an app".into()).into());
    };
    let Some(current) = api.app_after_catch_up(&app.id).await? else {
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
    api.put_app(app).await
}

pub(super) async fn get_app(api: &HeraldApi, request: Request<pb::GetAppRequest>) -> Reply<pb::AppReply> {
    auth::admin(&api.node, &request)?;
    let id = request.into_inner().id;
    match api.app_after_catch_up(&id).await? {
        Some(app) => Ok(Response::new(pb::AppReply {
            app: Some(app_to_pb(app)),
        })),
        None => Err(ApiError::NotFound(format!("unknown app {id:?}")).into()),
    }
}

pub(super) async fn list_apps(
    api: &HeraldApi,
    request: Request<pb::ListAppsRequest>,
) -> Reply<pb::ListAppsReply> {
    auth::admin(&api.node, &request)?;
    let meta = api.node.groups().meta();
    api.node.room().barrier.catch_up(meta).await;
    let apps = meta.reader().apps().map_err(ApiError::from)?;
    Ok(Response::new(pb::ListAppsReply {
        apps: apps.into_iter().map(app_to_pb).collect(),
    }))
}

pub(super) async fn delete_app(
    api: &HeraldApi,
    request: Request<pb::DeleteAppRequest>,
) -> Reply<pb::DeleteAppReply> {
    auth::admin(&api.node, &request)?;
    let id = request.into_inner().id;
    let groups = api.node.groups();
    let (result, _) = groups
        .meta()
        .write_one(Op::DeleteApp { app: id.clone() })
        .await
        .map_err(ApiError::from)?;
    if let OpResult::Rejected(r) = result {
        return Err(ApiError::from(r).into());
    }
    crate::app_copies::delete_everywhere(groups, &id)
        .await
        .map_err(|e| half_done(&id, "deleted", e))?;
    Ok(Response::new(pb::DeleteAppReply {}))
}

impl HeraldApi {
    /// App `id` from this node's state, after catching up with the leader if it is not there
    /// (read-your-writes: an app created through another node is found).
    async fn app_after_catch_up(&self, id: &str) -> Result<Option<AppConfig>, ApiError> {
        let meta = self.node.groups().meta();
        let reader = meta.reader();
        if let Some(app) = reader.app(id)? {
            return Ok(Some(app));
        }
        if !self.node.room().barrier.catch_up(meta).await {
            return Ok(None);
        }
        Ok(reader.app(id)?)
    }

    async fn put_app(&self, app: AppConfig) -> Reply<pb::AppReply> {
        let id = app.id.clone();
        let groups = self.node.groups();
        let (result, index) = groups
            .meta()
            .write_one(Op::PutApp(app))
            .await
            .map_err(ApiError::from)?;
        if let OpResult::Rejected(r) = result {
            return Err(ApiError::from(r).into());
        }
        // Read our own write: wait until this node applied it, then answer from the state.
        let reader = groups.meta().reader();
        reader.wait_applied(index).await;
        let Some(app) = reader.app(&id).map_err(ApiError::from)? else {
            return Err(ApiError::Internal(format!("app {id:?} missing after commit")).into());
        };
        crate::app_copies::put_everywhere(groups, &app)
            .await
            .map_err(|e| half_done(&id, "saved", e))?;
        Ok(Response::new(pb::AppReply {
            app: Some(app_to_pb(app)),
        }))
    }
}

/// An app change committed in the metadata group but not (yet) in every shard: the call failed,
/// and the metadata group's leader finishes it (`app_copies::reconcile`); a retry is safe.
fn half_done(id: &str, what: &str, e: herald_raft::WriteError) -> tonic::Status {
    ApiError::Unavailable {
        msg: format!(
            "app {id:?} was {what} in the metadata group but not yet in every shard ({e}); the \
             metadata group's leader copies it into the shards left behind within seconds"
        ),
        leader: None,
    }
    .into()
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
