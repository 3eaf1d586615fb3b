//! Topics on a connection: PUBLISH_TOPIC, SUBSCRIBE (catch-up from the retained log, then live),
//! a kept session's subscriptions, GET_RETAINED.

use super::*;

impl<S> Conn<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    /// A client's own publish to a topic the app allows (`AppConfig::client_publish`): committed
    /// like the API's PublishTopic; the answer comes when it is (or why not).
    pub(super) fn on_publish_topic(&mut self, p: pc::PublishTopic) {
        let (sid, rid) = (p.session_id, p.request_id);
        let answer = move |seq: u64, code: ErrorCode, msg: String| pc::TopicPublished {
            session_id: sid,
            request_id: rid,
            topic_seq: seq,
            error: code as i32,
            message: msg,
        };
        let Some(i) = self.find(sid) else {
            return self.send(Kind::TopicPublished(answer(
                0,
                ErrorCode::UnknownSession,
                "no such session".into(),
            )));
        };
        let app = match self.room.meta().app(&self.sessions[i].app) {
            Ok(Some(a)) => a,
            _ => {
                return self.send(Kind::TopicPublished(answer(
                    0,
                    ErrorCode::UnknownApp,
                    "unknown app".into(),
                )))
            }
        };
        let t = p.topic.as_str();
        let valid = !t.is_empty()
            && t.len() <= MAX_NAME
            && t != BROADCAST
            && !t.starts_with('$')
            && herald_mqtt::topic::validate_name(t).is_ok();
        if !valid {
            return self.send(Kind::TopicPublished(answer(
                0,
                ErrorCode::BadRequest,
                "a topic name of 1 to 256 bytes, without + or # and not starting with $".into(),
            )));
        }
        if !app
            .client_publish
            .iter()
            .any(|f| herald_mqtt::topic::matches(f, t))
        {
            return self.send(Kind::TopicPublished(answer(
                0,
                ErrorCode::PermissionDenied,
                format!("app {:?} does not let its clients publish to {t:?}", app.id),
            )));
        }
        if p.payload.len() > app.limits.max_payload as usize {
            return self.send(Kind::TopicPublished(answer(
                0,
                ErrorCode::BadRequest,
                format!(
                    "payload of {} bytes exceeds the app's limit of {}",
                    p.payload.len(),
                    app.limits.max_payload
                ),
            )));
        }
        // Bounded: each waits for a Raft commit in its own task.
        let in_flight = &self.shared.publishes_in_flight;
        if in_flight.fetch_add(1, Ordering::AcqRel) >= MAX_PUBLISHES_IN_FLIGHT {
            in_flight.fetch_sub(1, Ordering::AcqRel);
            return self.send(Kind::TopicPublished(answer(
                0,
                ErrorCode::RateLimited,
                format!("at most {MAX_PUBLISHES_IN_FLIGHT} publishes waiting per connection"),
            )));
        }
        let raft = self.room.groups.of_topic(&app.id, &p.topic).clone();
        let publish = herald_raft::Publish {
            app: app.id,
            topic: p.topic,
            msg_id: format!("c{}-{:016x}", self.room.groups.id(), rand::random::<u64>()),
            payload: p.payload,
            idempotency_key: None,
        };
        let op = if p.retain {
            Op::PublishRetained {
                publish,
                ttl_ms: p.retain_ttl_ms,
            }
        } else {
            Op::Publish(publish)
        };
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let reply = match raft.write_one(op).await {
                Ok((OpResult::Published(p), _)) => answer(p.seq, ErrorCode::Unspecified, String::new()),
                Ok((OpResult::Rejected(r), _)) => answer(0, ErrorCode::BadRequest, r.to_string()),
                Ok((other, _)) => answer(0, ErrorCode::Internal, format!("unexpected result {other:?}")),
                Err(e) => answer(0, ErrorCode::NotReady, e.to_string()),
            };
            shared.publishes_in_flight.fetch_sub(1, Ordering::AcqRel);
            shared.push(crate::room::outbox::Outbound::Frame(frame::encode_to_bytes(
                &Frame {
                    kind: Some(Kind::TopicPublished(reply)),
                },
            )));
        });
    }

    /// Subscribes a session to a topic, replaying retained messages after the cursor first. In a
    /// kept session, `keep` commits the subscription (with the client's `options`) to the kept
    /// ones before it is answered; if that fails a new subscription is taken back and refused.
    pub(super) async fn subscribe(&mut self, sid: u32, t: TopicCursor, options: u32, keep: bool) {
        let refuse = |this: &mut Self, code: ErrorCode, msg: &str| {
            this.send(Kind::Subscribed(pc::Subscribed {
                session_id: sid,
                // An over-long name is not echoed (the answer must stay a small frame).
                topic: if t.topic.len() > MAX_NAME {
                    String::new()
                } else {
                    t.topic.clone()
                },
                seq: 0,
                error: code as i32,
                message: msg.into(),
            }));
        };
        let Some(i) = self.find(sid) else {
            return refuse(self, ErrorCode::UnknownSession, "no such session");
        };
        let app = self.sessions[i].app.clone();
        if t.topic.is_empty() || t.topic.len() > MAX_NAME {
            return refuse(self, ErrorCode::BadRequest, "topic must be 1 to 256 bytes");
        }
        let is_broadcast = t.topic == BROADCAST;
        let filter = crate::room::is_filter(&t.topic);
        if filter {
            if let Err(e) = herald_mqtt::topic::validate_filter(&t.topic) {
                return refuse(self, ErrorCode::BadRequest, &format!("bad topic filter: {e}"));
            }
            if t.last_seq.is_some() {
                return refuse(
                    self,
                    ErrorCode::BadRequest,
                    "a topic filter (+ or #) is live only: it takes no resume cursor",
                );
            }
        }
        let mut added = false;
        if !is_broadcast {
            if self.sessions[i].topics.len() >= MAX_TOPICS_PER_SESSION {
                return refuse(self, ErrorCode::BadRequest, "too many topics for this session");
            }
            if self.sessions[i].topics.contains(&t.topic) {
                self.room.unsubscribe(&app, &t.topic, self.shared.id, sid);
            } else {
                push_small(&mut self.sessions[i].topics, t.topic.clone());
                added = true;
            }
        }
        let mut current = if filter {
            0
        } else {
            self.room
                .topic_state(&app, &t.topic)
                .topic_meta(&app, &t.topic)
                .ok()
                .flatten()
                .map(|m| m.next_seq - 1)
                .unwrap_or(0)
        };
        match t.last_seq {
            None => {
                if is_broadcast {
                    self.room
                        .raise_floor(&app, BROADCAST, self.shared.id, sid, current);
                } else {
                    self.room
                        .subscribe(&app, &t.topic, &self.shared, sid, true, current);
                }
            }
            Some(cursor) => {
                // Not ready: live messages skip us until the replay below caught up.
                if is_broadcast {
                    self.room.unsubscribe(&app, BROADCAST, self.shared.id, sid);
                }
                self.room
                    .subscribe(&app, &t.topic, &self.shared, sid, false, cursor);
                let mut cursor = cursor;
                loop {
                    cursor = self.replay_topic(sid, &app, &t.topic, cursor);
                    if self.write_out().await.is_err() {
                        return;
                    }
                    if self.room.mark_ready(&app, &t.topic, self.shared.id, sid, cursor) {
                        break;
                    }
                }
                // The replay may have gone past the seq read above; live messages follow it.
                current = current.max(cursor);
            }
        }
        if keep {
            let Some(i) = self.find(sid).filter(|&i| self.sessions[i].kept) else {
                return self.answer_subscribed(sid, t.topic, current);
            };
            let sub = KeptSubscription {
                filter: t.topic.clone(),
                options,
            };
            if let Err(e) = self.keep_change(i, SubsChange::Subscribe(vec![sub])).await {
                if added {
                    self.sessions[i].topics.retain(|x| *x != t.topic);
                    self.room.unsubscribe(&app, &t.topic, self.shared.id, sid);
                }
                return refuse(
                    self,
                    ErrorCode::NotReady,
                    &format!("the subscription is not kept: {e}"),
                );
            }
        }
        self.answer_subscribed(sid, t.topic, current);
    }

    /// SUBSCRIBED for a subscription that took effect at topic seq `seq`.
    pub(super) fn answer_subscribed(&mut self, sid: u32, topic: String, seq: u64) {
        self.send(Kind::Subscribed(pc::Subscribed {
            session_id: sid,
            topic,
            seq,
            error: 0,
            message: String::new(),
        }));
    }

    /// Commits a change to the session's kept subscriptions, fenced by its epoch: a newer session
    /// of the device (a login elsewhere) makes it a no-op.
    pub(super) fn keep_change(
        &self,
        i: usize,
        change: SubsChange,
    ) -> impl Future<Output = Result<(), String>> + Send + 'static {
        let s = &self.sessions[i];
        let op = Op::SessionSubs {
            app: s.app.to_string(),
            user: s.user.to_string(),
            device: s.device.to_string(),
            epoch: s.epoch,
            change,
        };
        // User state: the user's shard, like the registration the epoch belongs to.
        commit_keep(self.room.user_group(&s.app, &s.user).clone(), op)
    }

    /// GET_RETAINED: the retained messages of the topics `filter` matches, for a topic or filter
    /// the session is subscribed to, each a PUSH marked RETAIN_STORED. Read after catching up with
    /// the leader (a retained message set through another node just before is seen), skipping
    /// those expired by the cluster's time; a filter reads the app's retained messages a page at
    /// a time, writing each page out before the next.
    pub(super) async fn send_retained(&mut self, sid: u32, filter: String) {
        let Some(i) = self.find(sid) else { return };
        if !self.sessions[i].topics.contains(&filter) {
            return debug!(conn = self.shared.id, %filter, "get_retained for a topic not subscribed; ignored");
        }
        let app = self.sessions[i].app.clone();
        let now = self.room.groups.meta().cluster_now_ms();
        let live = |m: &RetainedMessage| m.expires_ms == 0 || m.expires_ms > now;
        if !crate::room::is_filter(&filter) {
            // A topic's retained message lives in the topic's shard.
            let group = self.room.groups.of_topic(&app, &filter).clone();
            self.room.barrier.catch_up(&group).await;
            match group.reader().retained(&app, &filter) {
                Ok(Some(m)) if live(&m) => self.send_retained_one(sid, &filter, m),
                Ok(_) => {}
                Err(e) => warn!(error = %e, "cannot read a retained message"),
            }
            return;
        }
        // A filter matches topics of every shard: each group holding topics, one after the other.
        for group in self.room.groups.data().to_vec() {
            self.room.barrier.catch_up(&group).await;
            let mut after: Option<String> = None;
            loop {
                let page = match group.reader().retained_page(&app, after.as_deref(), PAGE) {
                    Ok(p) => p,
                    Err(e) => return warn!(error = %e, "cannot read retained messages"),
                };
                let full = page.len() == PAGE;
                for (topic, m) in page {
                    if live(&m) && herald_mqtt::topic::matches(&filter, &topic) {
                        self.send_retained_one(sid, &topic, m);
                    }
                    after = Some(topic);
                }
                if self.write_out().await.is_err() {
                    return;
                }
                if !full {
                    break;
                }
            }
        }
    }

    pub(super) fn send_retained_one(&mut self, sid: u32, topic: &str, m: RetainedMessage) {
        self.send(Kind::Push(pc::Push {
            session_id: sid,
            msg_id: m.msg_id,
            seq: 0,
            topic: topic.to_string(),
            topic_seq: m.seq,
            payload: m.payload,
            qos: Qos::AtLeastOnce as i32,
            pushed_at_ms: m.pushed_ms,
            expires_at_ms: m.expires_ms,
            retain: pc::Retain::Stored as i32,
        }));
    }

    /// Writes retained topic messages after `cursor` into the output; returns the new cursor.
    pub(super) fn replay_topic(&mut self, sid: u32, app: &str, topic: &str, mut cursor: u64) -> u64 {
        loop {
            let page = match self
                .room
                .topic_state(app, topic)
                .topic_since(app, topic, cursor, PAGE)
            {
                Ok(p) => p,
                Err(e) => {
                    warn!(error = %e, "cannot read topic log");
                    return cursor;
                }
            };
            for m in &page {
                if m.seq > cursor + 1 {
                    self.send(Kind::Gap(pc::Gap {
                        session_id: sid,
                        topic: topic.into(),
                        from_seq: cursor + 1,
                        to_seq: m.seq - 1,
                        reason: GapReason::Trimmed as i32,
                    }));
                }
                self.send(Kind::Push(pc::Push {
                    session_id: sid,
                    msg_id: m.msg_id.clone(),
                    seq: 0,
                    topic: topic.into(),
                    topic_seq: m.seq,
                    payload: m.payload.clone(),
                    qos: Qos::AtLeastOnce as i32,
                    pushed_at_ms: m.pushed_ms,
                    expires_at_ms: 0,
                    retain: pc::Retain::None as i32,
                }));
                cursor = m.seq;
            }
            if page.len() < PAGE {
                return cursor;
            }
        }
    }
}

/// Commits an `Op::SessionSubs` (see `Conn::keep_change`).
async fn commit_keep(group: herald_raft::RaftNode, op: Op) -> Result<(), String> {
    match group.write_one(op).await {
        Ok((OpResult::Done, _)) => Ok(()),
        Ok((OpResult::Superseded { epoch }, _)) => Err(format!(
            "a newer session of the device (epoch {epoch}) holds the kept subscriptions"
        )),
        Ok((OpResult::Rejected(r), _)) => Err(r.to_string()),
        Ok((other, _)) => Err(format!("unexpected result {other:?}")),
        Err(e) => Err(e.to_string()),
    }
}
