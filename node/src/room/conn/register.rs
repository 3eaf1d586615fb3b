//! Opening a session: the token check, the registration through the user's shard and the
//! local indexing, and the WELCOME it answers.

use super::*;

/// The session's app and its token's claims, from this node's state machine as it is.
fn check_token(room: &Room, o: &OpenSession) -> Result<token::Claims, (ErrorCode, String)> {
    let app: AppConfig = match room.meta().app(&o.app) {
        Ok(Some(a)) => a,
        Ok(None) => return Err((ErrorCode::UnknownApp, format!("unknown app {:?}", o.app))),
        Err(e) => return Err((ErrorCode::Internal, e.to_string())),
    };
    token::verify(
        &o.token,
        &app.secrets,
        &o.app,
        &o.user,
        &o.device,
        room.token_now_s(),
    )
    .map_err(|e| {
        let code = match e {
            token::TokenError::Expired { .. } => ErrorCode::TokenExpired,
            token::TokenError::WrongApp { .. }
            | token::TokenError::WrongUser { .. }
            | token::TokenError::WrongDevice { .. } => ErrorCode::PermissionDenied,
            _ => ErrorCode::BadToken,
        };
        (code, e.to_string())
    })
}

/// What [`register`] hands the connection: the session, its WELCOME, the topics the client asked
/// for, and the subscriptions a kept session continues with.
pub(super) struct Opened {
    pub(super) session: Session,
    pub(super) welcome: pc::Welcome,
    pub(super) topics: Vec<TopicCursor>,
    pub(super) kept: Vec<KeptSubscription>,
}

/// Token check, Raft registration (with the start of a kept session in the same entry) and local
/// indexing of a new session (boxed by the caller).
pub(super) async fn register(
    room: Arc<Room>,
    shared: Arc<ConnShared>,
    o: OpenSession,
) -> Result<Opened, (ErrorCode, String)> {
    // An unknown app or a token no secret of the app signed may be an admin write this node has
    // not applied yet: catch up with the leader once before refusing (read-your-writes).
    let claims = match check_token(&room, &o) {
        Err((ErrorCode::UnknownApp | ErrorCode::BadToken, _))
            if room.barrier.catch_up(room.groups.meta()).await =>
        {
            check_token(&room, &o)?
        }
        r => r?,
    };
    let register = Register {
        app: o.app.clone(),
        user: o.user.clone(),
        device: o.device.clone(),
        platform: o.platform.clone(),
        node: room.config.node_id,
        conn: shared.id,
        session: o.session_id,
    };
    // The registration names the device's newest session this node knows of: one registered
    // after it (a login of the device elsewhere) makes it a no-op. So a registration that commits
    // after its HELLO failed never replaces the login that followed (issue 26).
    // The user's group: its registry, mailbox and epochs.
    let group = room.user_group(&o.app, &o.user);
    let mut seen_epoch = match group.reader().session(&o.app, &o.user, &o.device) {
        Ok(s) => s.map_or(0, |s| s.epoch),
        Err(e) => return Err((ErrorCode::Internal, e.to_string())),
    };
    // Until dropped, this attempt's registration is not an orphan even once applied.
    let attempt = crate::room::registrations::Registrations::begin(&room, shared.id, o.session_id);
    // A kept session starts in the registration's entry, right after it: it continues what the
    // device's earlier sessions kept (or drops it: clean) as the session it just registered.
    let start = o.keep.map(|k| {
        Op::SessionStart(herald_raft::SessionStart {
            app: o.app.clone(),
            user: o.user.clone(),
            device: o.device.clone(),
            node: register.node,
            conn: register.conn,
            session: register.session,
            clean: k.clean,
            expiry_s: k.expiry_s,
        })
    });
    let mut retried = false;
    let (registered, kept, index) = loop {
        let mut ops = vec![Op::RegisterSeen {
            register: register.clone(),
            seen_epoch,
        }];
        ops.extend(start.clone());
        let committed = group.write(ops).await.map_err(|e| match e {
            WriteError::Invalid(m) => (ErrorCode::BadRequest, m),
            other => (
                ErrorCode::NotReady,
                format!("cannot register the session: {other}"),
            ),
        })?;
        let index = committed.log_index;
        let mut results = committed.results.into_iter();
        let result = results.next().unwrap_or(OpResult::Done);
        match result {
            OpResult::Registered(r) => {
                let kept = match results.next() {
                    None => None,
                    Some(OpResult::Kept {
                        present,
                        subscriptions,
                    }) => Some((present, subscriptions)),
                    Some(other) => {
                        return Err((
                            ErrorCode::NotReady,
                            format!("the kept session did not start ({other:?}); retry"),
                        ))
                    }
                };
                break (r, kept, index);
            }
            // The device has a session this node did not know of when proposing: usually one it
            // had not applied yet (a fast re-login through another node). This call is live (its
            // connection waits for the answer), so it is the newest login: catch up, then again
            // once, naming that session. A registration whose call is over is never re-proposed.
            OpResult::Superseded { epoch } if !retried => {
                retried = true;
                room.barrier.catch_up(group).await;
                seen_epoch = match group.reader().session(&o.app, &o.user, &o.device) {
                    Ok(s) => s.map_or(0, |s| s.epoch).max(epoch),
                    Err(e) => return Err((ErrorCode::Internal, e.to_string())),
                };
            }
            OpResult::Superseded { epoch } => {
                return Err((
                    ErrorCode::NotReady,
                    format!("logins of this device keep racing this one (epoch {epoch}); retry"),
                ))
            }
            OpResult::Rejected(r) => return Err((ErrorCode::UnknownApp, r.to_string())),
            other => return Err((ErrorCode::Internal, format!("unexpected result {other:?}"))),
        }
    };
    if tokio::time::timeout(Duration::from_secs(10), group.reader().wait_applied(index))
        .await
        .is_err()
    {
        return Err((
            ErrorCode::NotReady,
            "this node is not caught up; try another".into(),
        ));
    }
    let app_id: Arc<str> = o.app.as_str().into();
    let user: Arc<str> = o.user.as_str().into();
    let device: Arc<str> = o.device.as_str().into();
    room.index_session(
        &app_id,
        &user,
        LocalSession {
            conn: shared.clone(),
            session_id: o.session_id,
            device: device.clone(),
            epoch: registered.epoch,
        },
    );
    attempt.taken(registered.epoch);
    // A login that raced ours and won may have been applied before we were indexed: check.
    match group.reader().session(&o.app, &o.user, &o.device) {
        Ok(Some(s)) if s.epoch != registered.epoch => shared.kick(Kick {
            session_id: o.session_id,
            epoch: registered.epoch,
            code: KickReason::Replaced,
            reason: "replaced by a newer login".into(),
        }),
        // Ended between its apply and our indexing: by a Kick or an Unregister, or because this
        // node was declared down — then the client must move to another node (a NODE_DOWN kick
        // with redirects), not give up (the fault suite saw a device stop for good here).
        Ok(None) => {
            let (code, reason) = if room.ended_by_node_down(&o.app, &o.user, registered.epoch).await {
                (KickReason::NodeDown, "node declared down")
            } else {
                (KickReason::Admin, "session ended")
            };
            shared.kick(Kick {
                session_id: o.session_id,
                epoch: registered.epoch,
                code,
                reason: reason.into(),
            })
        }
        _ => {}
    }
    // The client's cursor counts as an ack of everything up to it, but never beyond the mailbox's
    // head (applied above): a cursor past it would make the session skip the seqs new messages
    // get up to the cursor (the store clamps its record the same way).
    let head = match group.reader().mailbox_meta(&o.app, &o.user) {
        Ok(meta) => meta.map_or(0, |m| m.next_seq.saturating_sub(1)),
        Err(e) => return Err((ErrorCode::Internal, e.to_string())),
    };
    let claimed = o.last_acked_seq.min(head);
    let acked = claimed.max(registered.acked_seq);
    if claimed > registered.acked_seq {
        room.acks.record(&app_id, &user, &device, acked, acked);
    }
    let redelivery_upto = redelivery_bound(&room, &o, &registered, head);
    let c = &room.config;
    let welcome = pc::Welcome {
        session_id: o.session_id,
        epoch: registered.epoch,
        node_id: c.node_id,
        heartbeat_ms: c.heartbeat.as_millis() as u32,
        heartbeat_min_ms: c.heartbeat_min.as_millis() as u32,
        heartbeat_max_ms: c.heartbeat_max.as_millis() as u32,
        max_frame: c.max_frame as u32,
        version: herald_proto::PROTOCOL_VERSION,
        acked_seq: registered.acked_seq,
        redelivery_upto,
        session_present: kept.as_ref().is_some_and(|(present, _)| *present),
        subscriptions: kept
            .iter()
            .flat_map(|(_, subs)| subs)
            .map(|k| pc::KeptSubscription {
                topic: k.filter.clone(),
                options: k.options,
            })
            .collect(),
    };
    info!(conn = shared.id, app = %o.app, user = %o.user, device = %o.device, epoch = registered.epoch, kicked = registered.kicked.len(), "session open");
    let session = Session {
        id: o.session_id,
        app: app_id,
        user,
        device,
        epoch: registered.epoch,
        delivered: acked,
        acked,
        token_exp: claims.exp,
        topics: Vec::new(),
        kept: o.keep.is_some_and(|k| k.expiry_s > 0),
    };
    Ok(Opened {
        session,
        welcome,
        topics: o.topics,
        kept: kept.map(|(_, subs)| subs).unwrap_or_default(),
    })
}

/// The highest mailbox seq an earlier connection of the device may have written
/// (`Welcome.redelivery_upto`, MQTT's DUP flag), from what the state machine holds once this
/// registration is applied (`head` is the mailbox's last seq then):
///
/// - The registration displaced a live session of the device (a takeover, a node killed and not
///   yet declared down, a client back before its old connection ended): that connection may have
///   written anything stored until now, so `head`.
/// - Otherwise the earlier session ended first, and its end was committed together with its last
///   delivery cursor (`Conn::drop_session`), so the device's replicated delivery cursor bounds
///   what any earlier connection wrote, except when the earlier session's node died with its last
///   cursor batch uncommitted and was declared down before this login (then up to one batch of
///   `acks::FLUSH_EVERY` is resent as if new), or a kick ended it just before.
fn redelivery_bound(room: &Room, o: &OpenSession, registered: &herald_raft::Registered, head: u64) -> u64 {
    let same_device = |k: &herald_raft::Session| k.app == o.app && k.user == o.user && k.device == o.device;
    if registered.kicked.iter().any(same_device) {
        return head;
    }
    match room.user_state(&o.app, &o.user).devices(&o.app, &o.user) {
        Ok(devices) => devices
            .into_iter()
            .find(|(d, _)| *d == o.device)
            .map_or(0, |(_, s)| s.delivered.min(head)),
        // Unknown: everything may have been sent.
        Err(_) => head,
    }
}
