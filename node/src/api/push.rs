//! Push and PushStream: one message to many users' devices, stored (QoS 1) or to whoever is
//! online now (QoS 0).

use herald_proto::v1 as pb;
use herald_raft::{AppConfig, Enqueue, Op, OpResult, Target};
use tonic::{Request, Response, Status};

use super::error::ApiError;
use super::{auth, same_app, HeraldApi, Reply, ReplyStream};

/// Pushes of one PushStream running at once (and answers buffered for a slow reader).
const PUSH_STREAM_WINDOW: usize = 256;

pub(super) async fn push(api: &HeraldApi, request: Request<pb::PushRequest>) -> Reply<pb::PushReply> {
    let app = auth::app_caller(&api.node, &request).await?;
    tracing::Span::current().record("app", app.id.as_str());
    Ok(Response::new(api.push_one(app, request.into_inner()).await?))
}

pub(super) async fn push_stream(
    api: &HeraldApi,
    request: Request<tonic::Streaming<pb::PushRequest>>,
) -> Reply<ReplyStream<pb::PushStreamReply>> {
    let (app_id, key) = auth::app_credentials(&request)?;
    auth::app_by_key(&api.node, &app_id, &key).await?;
    tracing::Span::current().record("app", app_id.as_str());
    let (tx, rx) = tokio::sync::mpsc::channel(PUSH_STREAM_WINDOW);
    tokio::spawn(
        api.clone()
            .serve_push_stream(request.into_inner(), app_id, key, tx),
    );
    Ok(Response::new(Box::pin(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    )))
}

impl HeraldApi {
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
        let enqueue = Enqueue {
            app: app.id.clone(),
            msg_id,
            targets: Vec::new(),
            payload: req.payload,
            ttl_ms: req.ttl_ms,
            idempotency_key: Some(req.idempotency_key).filter(|k| !k.is_empty()),
        };
        let order: std::collections::HashMap<String, usize> = req
            .targets
            .iter()
            .enumerate()
            .map(|(i, t)| (t.user.clone(), i))
            .collect();
        let targets = req.targets.into_iter().map(|t| Target {
            user: t.user,
            devices: t.devices,
        });
        // One Enqueue per group holding some of the targets (with no shards, one).
        let parts = split_by_group(self.node.groups(), &app.id, targets)
            .into_iter()
            .map(|(group, targets)| {
                let op = Op::Enqueue(Enqueue {
                    targets,
                    ..enqueue.clone()
                });
                (group, op)
            })
            .collect::<Vec<_>>();
        // BUG INJECTION (test-only cargo feature `bug-ack-before-commit`, for the jepsen suite):
        // answer the pusher as soon as the write is proposed, before it commits.
        #[cfg(feature = "bug-ack-before-commit")]
        {
            for (group, op) in parts {
                tokio::spawn(async move { group.write_one(op).await });
            }
            return Ok(pb::PushReply {
                msg_id: enqueue.msg_id,
                ..Default::default()
            });
        }
        #[allow(unreachable_code)]
        let writes = parts
            .into_iter()
            .map(|(group, op)| async move { group.write_one(op).await });
        let mut reply = pb::PushReply {
            msg_id: enqueue.msg_id,
            ..Default::default()
        };
        // Every part is waited for, so a failure of one never hides that others committed.
        let mut failure: Option<tonic::Status> = None;
        for done in futures::future::join_all(writes).await {
            let outcome = match done {
                Ok((OpResult::Enqueued(e), log_index)) => {
                    // A duplicate answers the msg id the first attempt had (each part stored it).
                    reply.msg_id = e.msg_id;
                    reply
                        .seqs
                        .extend(e.seqs.into_iter().map(|(user, seq)| pb::UserSeq { user, seq }));
                    reply.duplicate |= e.duplicate;
                    reply.log_index = reply.log_index.max(log_index);
                    Ok(())
                }
                Ok((OpResult::Rejected(r), _)) => Err(ApiError::from(r).into()),
                Ok((other, _)) => Err(ApiError::Internal(format!("unexpected result {other:?}")).into()),
                Err(e) => Err(tonic::Status::from(ApiError::from(e))),
            };
            if let Err(status) = outcome {
                failure.get_or_insert(status);
            }
        }
        // In target order, as one group's answer has them.
        reply
            .seqs
            .sort_by_key(|s| order.get(&s.user).copied().unwrap_or(usize::MAX));
        match failure {
            None => Ok(reply),
            Some(status) if reply.seqs.is_empty() => Err(status),
            // Stored for the users of some shards only: the caller must not take it for a
            // refusal of the whole push (a retry with the same idempotency key completes it).
            Some(status) => Err(tonic::Status::new(
                status.code(),
                format!(
                    "{} (stored for {} of the users, in the shards that took it; retry with the same \
                     idempotency key to complete it)",
                    status.message(),
                    reply.seqs.len()
                ),
            )),
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
        let groups = self.node.groups();
        let holders = |t: &pb::Target| {
            let sessions = groups
                .of_user(app, &t.user)
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
        let mut behind: Vec<&herald_raft::RaftNode> = targets
            .iter()
            .zip(&routes)
            .filter(|(_, nodes)| nodes.is_empty())
            .map(|(t, _)| groups.of_user(app, &t.user))
            .collect();
        behind.sort_by_key(|g| g.group());
        behind.dedup_by_key(|g| g.group());
        let barrier = &self.node.room().barrier;
        let caught_up = futures::future::join_all(behind.iter().map(|g| barrier.catch_up(g))).await;
        if caught_up.contains(&true) {
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
}

/// The targets grouped by the Raft group holding each user, each group's in request order.
fn split_by_group(
    groups: &herald_raft::Groups,
    app: &str,
    targets: impl Iterator<Item = Target>,
) -> Vec<(herald_raft::RaftNode, Vec<Target>)> {
    let mut parts: Vec<(herald_raft::RaftNode, Vec<Target>)> = Vec::new();
    for t in targets {
        let g = groups.of_user(app, &t.user);
        match parts.iter_mut().find(|(p, _)| p.group() == g.group()) {
            Some((_, list)) => list.push(t),
            None => parts.push((g.clone(), vec![t])),
        }
    }
    parts
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
