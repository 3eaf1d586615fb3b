//! Model-based test of the state machine: a plain in-memory model written from the semantics in
//! `types.rs` and the storage brief, against the RocksDB [`StateMachine`], over random op sequences.
//!
//! Names of one kind all have the same length ("a1", "u2", "d3", ...): the store orders string key
//! components by (length, bytes), the model's BTreeMaps by bytes, and with equal lengths the two
//! orders agree, so iteration orders (NodeDown, Kick, Expire) match without modelling the encoding.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use bytes::Bytes;
use herald_raft::typ::{Entry, LogId};
use herald_raft::*;
use openraft::storage::RaftStateMachine;
use openraft::{CommittedLeaderId, EntryPayload, RaftSnapshotBuilder};
use parking_lot::Mutex;
use proptest::prelude::*;
use tempfile::TempDir;

const APPS: [&str; 3] = ["a1", "a2", "a3"]; // a3 is never created: ops on it are rejected
const USERS: [&str; 3] = ["u1", "u2", "u3"];
const DEVICES: [&str; 3] = ["d1", "d2", "d3"];
const PLATFORMS: [&str; 2] = ["p1", "p2"];
const TOPICS: [&str; 2] = ["t1", "t2"];
const KEYS: [&str; 3] = ["k1", "k2", "k3"];
const MSG_IDS: [&str; 3] = ["m1", "m2", "m3"];
const IDEM_TTL: u64 = 24 * 3600 * 1000;

fn app_config(id: &str, variant: u8) -> AppConfig {
    let (limits, policy, callbacks) = if id == "a1" {
        (
            AppLimits {
                mailbox_cap: 3,
                default_ttl_ms: 50,
                max_ttl_ms: 100,
                topic_retain: 2,
                max_payload: 8,
                max_targets: 1000,
            },
            DevicePolicy {
                max_per_platform: 1,
                max_per_user: 2,
            },
            vec!["cb".to_string()],
        )
    } else {
        (
            AppLimits {
                mailbox_cap: 5,
                default_ttl_ms: 30,
                max_ttl_ms: 60,
                topic_retain: 3,
                max_payload: 16,
                max_targets: 1000,
            },
            DevicePolicy {
                max_per_platform: 0,
                max_per_user: u32::from(variant % 3),
            },
            if variant % 2 == 0 {
                vec![]
            } else {
                vec!["cb".to_string()]
            },
        )
    };
    AppConfig {
        id: id.to_string(),
        name: format!("{id}-{variant}"),
        secrets: vec!["s".into()],
        api_keys: vec![],
        limits,
        policy,
        callbacks,
        created_ms: 12345, // ignored: the store sets it
        client_publish: Vec::new(),
    }
}

// ---- the model ------------------------------------------------------------------------------

type UserKey = (String, String);
type DevKey = (String, String, String);

#[derive(Clone)]
struct Model {
    log_time: u64,
    last_epoch: u64,
    next_event: u64,
    apps: BTreeMap<String, AppConfig>,
    nodes: BTreeMap<u64, NodeInfo>,
    sessions: BTreeMap<DevKey, Session>,
    devices: BTreeMap<DevKey, DeviceState>,
    mail: BTreeMap<UserKey, BTreeMap<u64, StoredMessage>>,
    mail_meta: BTreeMap<UserKey, MailboxMeta>,
    topics: BTreeMap<UserKey, BTreeMap<u64, TopicMessage>>,
    topic_meta: BTreeMap<UserKey, TopicMeta>,
    idem: BTreeMap<UserKey, (u64, OpResult)>,
    counters: BTreeMap<String, AppCounters>,
    outbox: BTreeMap<u64, SessionEvent>,
    /// The archive outbox: removed messages while archiving is on, bounded by ARCHIVE_CAP.
    archive: BTreeMap<u64, ArchivedMessage>,
    archive_state: ArchiveState,
    /// Msg-id locations of messages acked or trimmed before their TTL: (app, msg id, user, seq).
    /// DeliveryStatus still finds them until the message would have expired.
    kept: BTreeSet<(String, String, String, u64)>,
    /// The store's expiry entries for those locations: (expires, app, msg id, user, seq). Like
    /// the store's, they outlive a DeleteApp (they are keyed by time) and are skipped then.
    kept_expiry: BTreeSet<(u64, String, String, String, u64)>,
    /// Retained topic messages by (app, topic).
    retained: BTreeMap<UserKey, RetainedMessage>,
    /// Kept (persistent) sessions by (app, user, device).
    kept_sessions: BTreeMap<DevKey, KeptSession>,
}

/// The store's archive outbox cap (raft/src/sm/apply/archive.rs); the model applies the same bound.
const ARCHIVE_CAP: u64 = 100_000;

fn dk(app: &str, user: &str, device: &str) -> DevKey {
    (app.to_string(), user.to_string(), device.to_string())
}
fn uk(app: &str, user: &str) -> UserKey {
    (app.to_string(), user.to_string())
}

impl Model {
    fn new() -> Self {
        Model {
            log_time: 0,
            last_epoch: 0,
            next_event: 1,
            apps: BTreeMap::new(),
            nodes: BTreeMap::new(),
            sessions: BTreeMap::new(),
            devices: BTreeMap::new(),
            mail: BTreeMap::new(),
            mail_meta: BTreeMap::new(),
            topics: BTreeMap::new(),
            topic_meta: BTreeMap::new(),
            idem: BTreeMap::new(),
            counters: BTreeMap::new(),
            outbox: BTreeMap::new(),
            archive: BTreeMap::new(),
            archive_state: ArchiveState::default(),
            kept: BTreeSet::new(),
            kept_expiry: BTreeSet::new(),
            retained: BTreeMap::new(),
            kept_sessions: BTreeMap::new(),
        }
    }

    /// The device's kept session unless its expiry passed by log time.
    fn live_kept(&self, key: &DevKey) -> Option<&KeptSession> {
        self.kept_sessions
            .get(key)
            .filter(|k| k.expires_ms == 0 || k.expires_ms > self.log_time)
    }

    /// The device's session ended (not taken over by a new login of it): its kept session
    /// expires `expiry_s` later, at once with 0, never with KEPT_FOREVER.
    fn end_kept(&mut self, key: &DevKey) {
        let now = self.log_time;
        let Some(k) = self.kept_sessions.get_mut(key) else {
            return;
        };
        if k.expires_ms != 0 {
            return;
        }
        match k.expiry_s {
            0 => {
                self.kept_sessions.remove(key);
            }
            KEPT_FOREVER => k.expires_ms = u64::MAX,
            e => k.expires_ms = now.saturating_add(u64::from(e) * 1000).min(u64::MAX - 1),
        }
    }

    /// Whether a msg id still has a location (a held message, or one acked or trimmed before its
    /// TTL): then an Enqueue with it is refused.
    fn msg_id_known(&self, app: &str, msg_id: &str) -> bool {
        self.kept.iter().any(|(a, m, _, _)| a == app && m == msg_id)
            || self
                .mail
                .iter()
                .any(|((a, _), held)| a == app && held.values().any(|m| m.msg_id == msg_id))
    }

    /// A message left the mailbox acked or trimmed: its location stays until its TTL.
    fn keep_location(&mut self, app: &str, user: &str, m: &StoredMessage) {
        self.kept
            .insert((app.into(), m.msg_id.clone(), user.into(), m.seq));
        self.kept_expiry
            .insert((m.expires_ms, app.into(), m.msg_id.clone(), user.into(), m.seq));
    }

    /// A message left a mailbox: into the archive outbox if archiving is on.
    fn archive_removed(&mut self, app: &str, user: &str, msg: StoredMessage, outcome: ArchiveOutcome) {
        let st = &mut self.archive_state;
        if !st.enabled {
            return;
        }
        let id = st.next_id;
        st.next_id += 1;
        self.archive.insert(
            id,
            ArchivedMessage {
                id,
                app: app.to_string(),
                user: user.to_string(),
                message: msg,
                removed_ms: self.log_time,
                outcome,
            },
        );
        if st.next_id - st.first > ARCHIVE_CAP {
            self.archive.remove(&st.first);
            st.first += 1;
            st.dropped += 1;
        }
    }

    fn event(&mut self, s: &Session, online: bool) {
        if self.apps.get(&s.app).is_none_or(|a| a.callbacks.is_empty()) {
            return;
        }
        let id = self.next_event;
        self.next_event += 1;
        self.outbox.insert(
            id,
            SessionEvent {
                id,
                app: s.app.clone(),
                user: s.user.clone(),
                device: s.device.clone(),
                platform: s.platform.clone(),
                online,
                epoch: s.epoch,
                node: s.node,
                at_ms: self.log_time,
            },
        );
    }

    fn drop_session(&mut self, key: &DevKey) -> Option<Session> {
        let s = self.take_over_session(key)?;
        self.end_kept(key);
        Some(s)
    }

    /// A new login of the same device displaces its session: what it kept goes on.
    fn take_over_session(&mut self, key: &DevKey) -> Option<Session> {
        let s = self.sessions.remove(key)?;
        self.event(&s, false);
        Some(s)
    }

    fn user_sessions(&self, app: &str, user: &str) -> Vec<Session> {
        let mut v: Vec<Session> = self
            .sessions
            .values()
            .filter(|s| s.app == app && s.user == user)
            .cloned()
            .collect();
        v.sort_by_key(|s| s.epoch);
        v
    }

    fn unknown(app: &str) -> OpResult {
        OpResult::Rejected(Rejection::UnknownApp(app.to_string()))
    }

    fn too_large(app: &AppConfig, size: usize) -> Option<OpResult> {
        (size > app.limits.max_payload as usize).then_some(OpResult::Rejected(Rejection::PayloadTooLarge {
            size,
            max: app.limits.max_payload,
        }))
    }

    fn seen(&self, app: &str, key: &Option<String>) -> Option<OpResult> {
        let (_, r) = self.idem.get(&uk(app, key.as_ref()?))?;
        Some(match r.clone() {
            OpResult::Enqueued(mut e) => {
                e.duplicate = true;
                OpResult::Enqueued(e)
            }
            OpResult::Published(mut p) => {
                p.duplicate = true;
                OpResult::Published(p)
            }
            other => other,
        })
    }

    fn remember(&mut self, app: &str, key: &Option<String>, r: &OpResult) {
        if let Some(k) = key {
            self.idem
                .insert(uk(app, k), (self.log_time + IDEM_TTL, r.clone()));
        }
    }

    fn counters(&mut self, app: &str) -> &mut AppCounters {
        self.counters.entry(app.to_string()).or_default()
    }

    fn op(&mut self, op: &Op) -> OpResult {
        match op {
            Op::PutAppV1(old) => self.op(&Op::PutApp(old.clone().into())),
            Op::PutAppV2(old) => self.op(&Op::PutApp(old.clone().into())),
            Op::PutApp(cfg) => {
                let mut cfg = cfg.clone();
                cfg.created_ms = self.apps.get(&cfg.id).map_or(self.log_time, |a| a.created_ms);
                self.apps.insert(cfg.id.clone(), cfg);
                OpResult::Done
            }
            Op::DeleteApp { app } => {
                if self.apps.remove(app).is_none() {
                    return Self::unknown(app);
                }
                self.sessions.retain(|k, _| &k.0 != app);
                self.devices.retain(|k, _| &k.0 != app);
                self.mail.retain(|k, _| &k.0 != app);
                self.mail_meta.retain(|k, _| &k.0 != app);
                self.topics.retain(|k, _| &k.0 != app);
                self.topic_meta.retain(|k, _| &k.0 != app);
                self.idem.retain(|k, _| &k.0 != app);
                self.kept.retain(|k| &k.0 != app);
                self.retained.retain(|k, _| &k.0 != app);
                self.kept_sessions.retain(|k, _| &k.0 != app);
                self.counters.remove(app);
                OpResult::Done
            }
            Op::SetNode(info) => {
                self.nodes.insert(info.id, info.clone());
                OpResult::Done
            }
            Op::RegisterSeen { register, seen_epoch } => {
                match self
                    .sessions
                    .get(&dk(&register.app, &register.user, &register.device))
                {
                    Some(s) if s.epoch > *seen_epoch => OpResult::Superseded { epoch: s.epoch },
                    _ => self.op(&Op::Register(register.clone())),
                }
            }
            Op::Register(r) => {
                let Some(app) = self.apps.get(&r.app).cloned() else {
                    return Self::unknown(&r.app);
                };
                self.last_epoch += 1;
                let epoch = self.last_epoch;
                let key = dk(&r.app, &r.user, &r.device);
                let mut kicked: Vec<Session> = self.take_over_session(&key).into_iter().collect();
                let session = Session {
                    app: r.app.clone(),
                    user: r.user.clone(),
                    device: r.device.clone(),
                    platform: r.platform.clone(),
                    node: r.node,
                    conn: r.conn,
                    session: r.session,
                    epoch,
                    since_ms: self.log_time,
                };
                self.sessions.insert(key.clone(), session.clone());
                let dev = self.devices.entry(key).or_default();
                dev.platform = r.platform.clone();
                dev.last_seen_ms = self.log_time;
                let acked_seq = dev.acked;
                if app.policy.max_per_platform > 0 {
                    let same: Vec<Session> = self
                        .user_sessions(&r.app, &r.user)
                        .into_iter()
                        .filter(|s| s.platform == r.platform)
                        .collect();
                    let excess = same.len().saturating_sub(app.policy.max_per_platform as usize);
                    for s in &same[..excess] {
                        kicked.extend(self.drop_session(&dk(&s.app, &s.user, &s.device)));
                    }
                }
                if app.policy.max_per_user > 0 {
                    let all = self.user_sessions(&r.app, &r.user);
                    let excess = all.len().saturating_sub(app.policy.max_per_user as usize);
                    for s in &all[..excess] {
                        kicked.extend(self.drop_session(&dk(&s.app, &s.user, &s.device)));
                    }
                }
                self.event(&session, true);
                OpResult::Registered(Registered {
                    epoch,
                    acked_seq,
                    kicked,
                })
            }
            Op::Unregister {
                app,
                user,
                device,
                epoch,
            } => {
                if !self.apps.contains_key(app) {
                    return Self::unknown(app);
                }
                let key = dk(app, user, device);
                if self.sessions.get(&key).is_some_and(|s| s.epoch == *epoch) {
                    self.drop_session(&key);
                    OpResult::Dropped { sessions: 1 }
                } else {
                    OpResult::Done
                }
            }
            Op::NodeDown { node } => {
                let keys: Vec<DevKey> = self
                    .sessions
                    .iter()
                    .filter(|(_, s)| s.node == *node)
                    .map(|(k, _)| k.clone())
                    .collect();
                for k in &keys {
                    self.drop_session(k);
                }
                OpResult::Dropped {
                    sessions: keys.len() as u32,
                }
            }
            Op::Kick {
                app, user, device, ..
            } => {
                if !self.apps.contains_key(app) {
                    return Self::unknown(app);
                }
                let keys: Vec<DevKey> = self
                    .sessions
                    .keys()
                    .filter(|k| &k.0 == app && &k.1 == user && device.as_ref().is_none_or(|d| &k.2 == d))
                    .cloned()
                    .collect();
                for k in &keys {
                    self.drop_session(k);
                }
                OpResult::Dropped {
                    sessions: keys.len() as u32,
                }
            }
            Op::Enqueue(e) => {
                let Some(app) = self.apps.get(&e.app).cloned() else {
                    return Self::unknown(&e.app);
                };
                if let Some(first) = self.seen(&e.app, &e.idempotency_key) {
                    return first;
                }
                if let Some(r) = Self::too_large(&app, e.payload.len()) {
                    return r;
                }
                if e.targets.is_empty() {
                    return OpResult::Rejected(Rejection::Invalid("enqueue without targets".into()));
                }
                if self.msg_id_known(&e.app, &e.msg_id) {
                    return OpResult::Rejected(Rejection::MsgIdInUse(e.msg_id.clone()));
                }
                let ttl = if e.ttl_ms == 0 {
                    app.limits.default_ttl_ms
                } else {
                    e.ttl_ms
                };
                let expires_ms = self.log_time + ttl.min(app.limits.max_ttl_ms);
                let mut seqs = Vec::new();
                for t in &e.targets {
                    let key = uk(&e.app, &t.user);
                    let meta = self.mail_meta.entry(key.clone()).or_insert(MailboxMeta {
                        next_seq: 1,
                        count: 0,
                        trimmed_upto: 0,
                        expired_upto: 0,
                    });
                    let seq = meta.next_seq;
                    meta.next_seq += 1;
                    let held = self.mail.entry(key.clone()).or_default();
                    held.insert(
                        seq,
                        StoredMessage {
                            seq,
                            msg_id: e.msg_id.clone(),
                            payload: e.payload.clone(),
                            devices: t.devices.clone(),
                            pushed_ms: self.log_time,
                            expires_ms,
                        },
                    );
                    let mut trimmed = Vec::new();
                    while held.len() > app.limits.mailbox_cap as usize {
                        let (oldest, m) = held.pop_first().expect("non-empty");
                        meta.trimmed_upto = meta.trimmed_upto.max(oldest);
                        trimmed.push(m);
                    }
                    meta.count = held.len() as u64;
                    let trimmed_n = trimmed.len() as u64;
                    for m in trimmed {
                        self.keep_location(&e.app, &t.user, &m);
                        self.archive_removed(&e.app, &t.user, m, ArchiveOutcome::Trimmed);
                    }
                    let c = self.counters(&e.app);
                    c.stored += 1;
                    c.trimmed += trimmed_n;
                    seqs.push((t.user.clone(), seq));
                }
                let r = OpResult::Enqueued(Enqueued {
                    msg_id: e.msg_id.clone(),
                    seqs,
                    duplicate: false,
                    expires_ms,
                });
                self.remember(&e.app, &e.idempotency_key, &r);
                r
            }
            Op::Cursors(updates) => {
                for u in updates {
                    if !self.apps.contains_key(&u.app) {
                        continue;
                    }
                    let key = dk(&u.app, &u.user, &u.device);
                    let highest = self
                        .mail_meta
                        .get(&uk(&u.app, &u.user))
                        .map_or(0, |m| m.next_seq - 1);
                    let Some(dev) = self.devices.get_mut(&key) else {
                        continue;
                    };
                    dev.delivered = dev.delivered.max(u.delivered.min(highest));
                    dev.acked = dev.acked.max(u.acked.min(highest));
                    self.trim(&u.app, &u.user);
                }
                OpResult::Done
            }
            Op::Publish(p) => {
                let Some(app) = self.apps.get(&p.app).cloned() else {
                    return Self::unknown(&p.app);
                };
                if let Some(first) = self.seen(&p.app, &p.idempotency_key) {
                    return first;
                }
                if let Some(r) = Self::too_large(&app, p.payload.len()) {
                    return r;
                }
                let key = uk(&p.app, &p.topic);
                let meta = self.topic_meta.entry(key.clone()).or_insert(TopicMeta {
                    next_seq: 1,
                    count: 0,
                    trimmed_upto: 0,
                });
                let seq = meta.next_seq;
                meta.next_seq += 1;
                let log = self.topics.entry(key).or_default();
                log.insert(
                    seq,
                    TopicMessage {
                        seq,
                        msg_id: p.msg_id.clone(),
                        payload: p.payload.clone(),
                        pushed_ms: self.log_time,
                    },
                );
                let mut trimmed = 0;
                while log.len() > app.limits.topic_retain as usize {
                    let (oldest, _) = log.pop_first().expect("non-empty");
                    meta.trimmed_upto = meta.trimmed_upto.max(oldest);
                    trimmed += 1;
                }
                meta.count = log.len() as u64;
                let c = self.counters(&p.app);
                c.published += 1;
                c.topic_trimmed += trimmed;
                let r = OpResult::Published(Published {
                    msg_id: p.msg_id.clone(),
                    topic: p.topic.clone(),
                    seq,
                    duplicate: false,
                });
                self.remember(&p.app, &p.idempotency_key, &r);
                r
            }
            Op::Expire { max } => {
                // Due items in the store's key order: time, kind (message 0, idempotency key 1,
                // kept location 2), app, user / key / msg id, (user), seq.
                let mut due: Vec<(u64, u8, String, String, String, u64)> = Vec::new();
                for ((app, user), held) in &self.mail {
                    for m in held.values().filter(|m| m.expires_ms <= self.log_time) {
                        due.push((m.expires_ms, 0, app.clone(), user.clone(), String::new(), m.seq));
                    }
                }
                for ((app, key), (exp, _)) in &self.idem {
                    if *exp <= self.log_time {
                        due.push((*exp, 1, app.clone(), key.clone(), String::new(), 0));
                    }
                }
                for (exp, app, msg_id, user, seq) in &self.kept_expiry {
                    if *exp <= self.log_time {
                        due.push((*exp, 2, app.clone(), msg_id.clone(), user.clone(), *seq));
                    }
                }
                for ((app, topic), r) in &self.retained {
                    if r.expires_ms != 0 && r.expires_ms <= self.log_time {
                        due.push((r.expires_ms, 3, app.clone(), topic.clone(), String::new(), 0));
                    }
                }
                for ((app, user, device), k) in &self.kept_sessions {
                    if k.expires_ms != 0 && k.expires_ms <= self.log_time {
                        due.push((k.expires_ms, 4, app.clone(), user.clone(), device.clone(), 0));
                    }
                }
                due.sort();
                let (mut messages, mut keys, mut topic_entries) = (0, 0, 0);
                for (exp, kind, app, name, user, seq) in due {
                    if messages + keys + topic_entries >= *max {
                        break;
                    }
                    match kind {
                        0 => {
                            let key = uk(&app, &name);
                            let m = self.mail.get_mut(&key).expect("held").remove(&seq).expect("due");
                            self.archive_removed(&app, &name, m, ArchiveOutcome::Expired);
                            let meta = self.mail_meta.get_mut(&key).expect("meta");
                            meta.count -= 1;
                            meta.expired_upto = meta.expired_upto.max(seq);
                            self.counters(&app).expired += 1;
                            messages += 1;
                        }
                        1 => {
                            self.idem.remove(&uk(&app, &name));
                            keys += 1;
                        }
                        3 => {
                            self.retained.remove(&uk(&app, &name));
                            topic_entries += 1;
                        }
                        4 => {
                            self.kept_sessions.remove(&dk(&app, &name, &user));
                            keys += 1;
                        }
                        _ => {
                            // Scanned entries go whether they still point at something or not.
                            self.kept_expiry
                                .remove(&(exp, app.clone(), name.clone(), user.clone(), seq));
                            let held = self
                                .mail
                                .get(&uk(&app, &user))
                                .is_some_and(|h| h.contains_key(&seq));
                            if !held && self.kept.remove(&(app, name, user, seq)) {
                                keys += 1;
                            }
                        }
                    }
                }
                OpResult::Expired {
                    messages,
                    topic_entries,
                    keys,
                }
            }
            Op::EventsDone { upto } => {
                self.outbox.retain(|id, _| id > upto);
                OpResult::Done
            }
            Op::PublishRetained { publish, ttl_ms } => {
                let r = self.op(&Op::Publish(publish.clone()));
                let OpResult::Published(p) = &r else { return r };
                if p.duplicate {
                    return r;
                }
                let key = uk(&publish.app, &publish.topic);
                if publish.payload.is_empty() {
                    self.retained.remove(&key);
                } else {
                    let retained = RetainedMessage {
                        seq: p.seq,
                        msg_id: publish.msg_id.clone(),
                        payload: publish.payload.clone(),
                        pushed_ms: self.log_time,
                        expires_ms: if *ttl_ms == 0 { 0 } else { self.log_time + ttl_ms },
                    };
                    self.retained.insert(key, retained);
                }
                r
            }
            Op::SessionStart(st) => {
                let key = dk(&st.app, &st.user, &st.device);
                let Some(s) = self.sessions.get(&key) else {
                    return OpResult::Superseded { epoch: 0 };
                };
                if (s.node, s.conn, s.session) != (st.node, st.conn, st.session) {
                    return OpResult::Superseded { epoch: s.epoch };
                }
                let epoch = s.epoch;
                let (present, subscriptions) = match self.live_kept(&key) {
                    Some(k) if !st.clean => (true, k.subscriptions.clone()),
                    _ => (false, Vec::new()),
                };
                if st.expiry_s == 0 {
                    self.kept_sessions.remove(&key);
                } else {
                    self.kept_sessions.insert(
                        key,
                        KeptSession {
                            epoch,
                            expiry_s: st.expiry_s,
                            expires_ms: 0,
                            subscriptions: subscriptions.clone(),
                        },
                    );
                }
                OpResult::Kept {
                    present,
                    subscriptions,
                }
            }
            Op::SessionSubs {
                app,
                user,
                device,
                epoch,
                change,
            } => {
                let key = dk(app, user, device);
                let current = self.sessions.get(&key).map_or(0, |s| s.epoch);
                if current != *epoch {
                    return OpResult::Superseded { epoch: current };
                }
                let Some(mut k) = self.live_kept(&key).filter(|k| k.epoch == *epoch).cloned() else {
                    return OpResult::Rejected(Rejection::Invalid(
                        "the session keeps no subscriptions".into(),
                    ));
                };
                match change {
                    SubsChange::Subscribe(subs) => {
                        if let Some(bad) = subs
                            .iter()
                            .find(|s| s.filter.is_empty() || s.filter.len() > MAX_KEPT_FILTER)
                        {
                            return OpResult::Rejected(Rejection::Invalid(format!(
                                "a kept topic filter must be 1 to {MAX_KEPT_FILTER} bytes, not {}",
                                bad.filter.len()
                            )));
                        }
                        for sub in subs {
                            match k.subscriptions.iter_mut().find(|x| x.filter == sub.filter) {
                                Some(x) => x.options = sub.options,
                                None => k.subscriptions.push(sub.clone()),
                            }
                        }
                        if k.subscriptions.len() > MAX_KEPT_SUBSCRIPTIONS {
                            return OpResult::Rejected(Rejection::Invalid(format!(
                                "a session keeps at most {MAX_KEPT_SUBSCRIPTIONS} subscriptions"
                            )));
                        }
                    }
                    SubsChange::Unsubscribe(filters) => {
                        k.subscriptions.retain(|x| !filters.contains(&x.filter))
                    }
                    SubsChange::Expiry(e) => k.expiry_s = *e,
                }
                self.kept_sessions.insert(key, k);
                OpResult::Done
            }
            Op::SetArchive { enabled } => {
                self.archive_state.enabled = *enabled;
                OpResult::Done
            }
            Op::ArchiveDone { upto } => {
                let st = &mut self.archive_state;
                let end = upto.saturating_add(1).min(st.next_id);
                while st.first < end {
                    self.archive.remove(&st.first);
                    st.first += 1;
                }
                OpResult::Done
            }
        }
    }

    fn trim(&mut self, app: &str, user: &str) {
        let devices: BTreeMap<String, u64> = self
            .devices
            .iter()
            .filter(|(k, _)| k.0 == app && k.1 == user)
            .map(|(k, d)| (k.2.clone(), d.acked))
            .collect();
        if devices.is_empty() {
            return;
        }
        let key = uk(app, user);
        let Some(held) = self.mail.get_mut(&key) else {
            return;
        };
        let mut acked = 0;
        let mut removed = Vec::new();
        while let Some((&seq, msg)) = held.first_key_value() {
            let done = if msg.devices.is_empty() {
                devices.values().all(|a| *a >= seq)
            } else {
                msg.devices
                    .iter()
                    .all(|d| devices.get(d).is_some_and(|a| *a >= seq))
            };
            if !done {
                break;
            }
            removed.extend(held.pop_first().map(|(_, m)| m));
            acked += 1;
        }
        for m in removed {
            self.keep_location(app, user, &m);
            self.archive_removed(app, user, m, ArchiveOutcome::Acked);
        }
        if acked > 0 {
            self.mail_meta.get_mut(&key).expect("meta").count -= acked;
            self.counters(app).acked += acked;
        }
    }
}

// ---- random ops -----------------------------------------------------------------------------

/// An op as generated; some parts are resolved against the model when applied (which session an
/// Unregister names, with its right epoch or a wrong one).
#[derive(Debug, Clone)]
enum Gen {
    Op(Op),
    Unregister {
        pick: usize,
        right: bool,
    },
    /// A SessionStart for a live session (pick 0: the newest, as in a registration's entry), or
    /// with a connection that is not the session's.
    Start {
        pick: usize,
        right: bool,
        clean: bool,
        expiry_s: u32,
    },
    /// A SessionSubs for a live session, with its epoch or a wrong one.
    Subs {
        pick: usize,
        right: bool,
        change: SubsChange,
    },
}

fn name<const N: usize>(names: [&'static str; N]) -> impl Strategy<Value = String> {
    (0..N).prop_map(move |i| names[i].to_string())
}

fn payload() -> impl Strategy<Value = Bytes> {
    prop_oneof![4 => 0usize..8, 1 => 8usize..20].prop_map(|n| Bytes::from(vec![7u8; n]))
}

fn idem_key() -> impl Strategy<Value = Option<String>> {
    prop_oneof![2 => Just(None), 1 => name(KEYS).prop_map(Some)]
}

fn known_app() -> impl Strategy<Value = String> {
    prop_oneof![10 => name(["a1", "a2"]), 1 => Just("a3".to_string())]
}

fn gen_op() -> impl Strategy<Value = Gen> {
    let register = (
        known_app(),
        name(USERS),
        name(DEVICES),
        name(PLATFORMS),
        1u64..4,
        0u64..100,
        proptest::option::of(0u64..40),
    )
        .prop_map(|(app, user, device, platform, node, conn, seen)| {
            let register = Register {
                app,
                user,
                device,
                platform,
                node,
                conn,
                session: 1,
            };
            Gen::Op(match seen {
                None => Op::Register(register),
                Some(seen_epoch) => Op::RegisterSeen { register, seen_epoch },
            })
        });
    let target = (
        name(USERS),
        proptest::sample::subsequence(DEVICES.to_vec(), 0..=2),
    )
        .prop_map(|(user, devs)| Target {
            user,
            devices: devs.into_iter().map(String::from).collect(),
        });
    let enqueue = (
        known_app(),
        name(MSG_IDS),
        proptest::collection::vec(target, 0..3),
        payload(),
        prop_oneof![Just(0u64), 1u64..150],
        idem_key(),
    )
        .prop_map(|(app, msg_id, targets, payload, ttl_ms, idempotency_key)| {
            Gen::Op(Op::Enqueue(Enqueue {
                app,
                msg_id,
                targets,
                payload,
                ttl_ms,
                idempotency_key,
            }))
        });
    let cursor = (known_app(), name(USERS), name(DEVICES), 0u64..8, 0u64..8).prop_map(
        |(app, user, device, delivered, acked)| CursorUpdate {
            app,
            user,
            device,
            delivered,
            acked,
        },
    );
    let publish = (known_app(), name(TOPICS), name(MSG_IDS), payload(), idem_key()).prop_map(
        |(app, topic, msg_id, payload, idempotency_key)| {
            Gen::Op(Op::Publish(Publish {
                app,
                topic,
                msg_id,
                payload,
                idempotency_key,
            }))
        },
    );
    let retained = (
        known_app(),
        name(TOPICS),
        name(MSG_IDS),
        payload(),
        idem_key(),
        prop_oneof![Just(0u64), 1u64..100],
    )
        .prop_map(|(app, topic, msg_id, payload, idempotency_key, ttl_ms)| {
            Gen::Op(Op::PublishRetained {
                publish: Publish {
                    app,
                    topic,
                    msg_id,
                    payload,
                    idempotency_key,
                },
                ttl_ms,
            })
        });
    let expiry = prop_oneof![Just(0u32), Just(1u32), Just(5u32), Just(KEPT_FOREVER)];
    let start = (
        0usize..4,
        prop_oneof![4 => Just(true), 1 => Just(false)],
        any::<bool>(),
        expiry.clone(),
    )
        .prop_map(|(pick, right, clean, expiry_s)| Gen::Start {
            pick,
            right,
            clean,
            expiry_s,
        });
    let filter = prop_oneof![
        name(TOPICS),
        Just("t+".to_string()),
        Just(String::new()),
        Just("f".repeat(257))
    ];
    let change = prop_oneof![
        3 => proptest::collection::vec((filter.clone(), 0u32..4), 1..3).prop_map(|subs| {
            SubsChange::Subscribe(
                subs.into_iter()
                    .map(|(filter, options)| KeptSubscription { filter, options })
                    .collect(),
            )
        }),
        1 => proptest::collection::vec(filter, 1..3).prop_map(SubsChange::Unsubscribe),
        1 => expiry.prop_map(SubsChange::Expiry),
    ];
    let subs = (0usize..4, prop_oneof![4 => Just(true), 1 => Just(false)], change)
        .prop_map(|(pick, right, change)| Gen::Subs { pick, right, change });
    prop_oneof![
        6 => register,
        3 => retained,
        4 => start,
        4 => subs,
        3 => (0usize..8, any::<bool>()).prop_map(|(pick, right)| Gen::Unregister { pick, right }),
        1 => (1u64..4).prop_map(|node| Gen::Op(Op::NodeDown { node })),
        1 => (known_app(), name(USERS), proptest::option::of(name(DEVICES))).prop_map(|(app, user, device)| {
            Gen::Op(Op::Kick { app, user, device, reason: "test".into() })
        }),
        8 => enqueue,
        5 => proptest::collection::vec(cursor, 1..4).prop_map(|c| Gen::Op(Op::Cursors(c))),
        4 => publish,
        2 => (0u32..6).prop_map(|max| Gen::Op(Op::Expire { max })),
        1 => (0u64..20).prop_map(|upto| Gen::Op(Op::EventsDone { upto })),
        1 => any::<bool>().prop_map(|enabled| Gen::Op(Op::SetArchive { enabled })),
        1 => (0u64..30).prop_map(|upto| Gen::Op(Op::ArchiveDone { upto })),
        1 => (0usize..2, 0u8..4).prop_map(|(i, v)| Gen::Op(Op::PutApp(app_config(["a1", "a2"][i], v)))),
        1 => name(["a1", "a2", "a3"]).prop_map(|app| Gen::Op(Op::DeleteApp { app })),
        1 => (1u64..4).prop_map(|id| Gen::Op(Op::SetNode(NodeInfo {
            id,
            grpc_addr: format!("g{id}"),
            client_addr: String::new(),
            tls_addr: String::new(),
            ws_addr: String::new(),
        }))),
    ]
}

/// One entry: time step (may go back: log time must not) and its ops.
fn gen_entry() -> impl Strategy<Value = (i64, Vec<Gen>)> {
    // Now and then a day passes, so idempotency keys expire too.
    let step = prop_oneof![30 => -20i64..40, 1 => Just(IDEM_TTL as i64)];
    (step, proptest::collection::vec(gen_op(), 1..4))
}

/// Entries grouped into apply() calls of 1..=3 entries.
fn gen_calls(max_entries: usize) -> impl Strategy<Value = Vec<Vec<(i64, Vec<Gen>)>>> {
    proptest::collection::vec(proptest::collection::vec(gen_entry(), 1..4), 1..max_entries)
}

/// A live session of the model: pick 0 is the newest (the one a registration earlier in the
/// entry made), others by device order.
fn pick_session(model: &Model, pick: usize) -> Option<&Session> {
    if pick == 0 {
        return model.sessions.values().max_by_key(|s| s.epoch);
    }
    let all: Vec<&Session> = model.sessions.values().collect();
    all.get(pick % all.len().max(1)).copied()
}

fn resolve(model: &Model, g: &Gen) -> Op {
    match g {
        Gen::Op(op) => op.clone(),
        Gen::Start {
            pick,
            right,
            clean,
            expiry_s,
        } => {
            let (app, user, device, node, conn, session) = match pick_session(model, *pick) {
                Some(s) => (
                    s.app.clone(),
                    s.user.clone(),
                    s.device.clone(),
                    s.node,
                    if *right { s.conn } else { s.conn + 1000 },
                    s.session,
                ),
                None => ("a1".into(), "u1".into(), "d1".into(), 1, 1, 1),
            };
            Op::SessionStart(SessionStart {
                app,
                user,
                device,
                node,
                conn,
                session,
                clean: *clean,
                expiry_s: *expiry_s,
            })
        }
        Gen::Subs { pick, right, change } => {
            let (app, user, device, epoch) = match pick_session(model, *pick) {
                Some(s) => (
                    s.app.clone(),
                    s.user.clone(),
                    s.device.clone(),
                    if *right {
                        s.epoch
                    } else {
                        s.epoch.saturating_sub(1)
                    },
                ),
                None => ("a1".into(), "u1".into(), "d1".into(), 1),
            };
            Op::SessionSubs {
                app,
                user,
                device,
                epoch,
                change: change.clone(),
            }
        }
        Gen::Unregister { pick, right } => {
            let all: Vec<&Session> = model.sessions.values().collect();
            match all.get(pick % all.len().max(1)) {
                Some(s) => Op::Unregister {
                    app: s.app.clone(),
                    user: s.user.clone(),
                    device: s.device.clone(),
                    epoch: if *right { s.epoch } else { s.epoch + 1 },
                },
                None => Op::Unregister {
                    app: "a1".into(),
                    user: "u1".into(),
                    device: "d1".into(),
                    epoch: 1,
                },
            }
        }
    }
}

// ---- driving both ---------------------------------------------------------------------------

/// Records which entries the observer heard about, to check one call per entry, in order.
#[derive(Default)]
struct Recorder(Mutex<Vec<u64>>);

impl ApplyObserver for Recorder {
    fn applied(&self, log_index: u64, _events: Vec<ApplyEvent>) {
        self.0.lock().push(log_index);
    }
}

struct Run {
    model: Model,
    next_index: u64,
    ts: u64,
}

impl Run {
    fn new() -> Self {
        Run {
            model: Model::new(),
            next_index: 1,
            ts: 1_000,
        }
    }

    /// Applies the setup entry (both apps) and then `calls`, comparing every result.
    async fn drive(
        &mut self,
        sm: &mut StateMachine,
        calls: &[Vec<(i64, Vec<Gen>)>],
    ) -> Result<(), TestCaseError> {
        for call in calls {
            let mut entries = Vec::new();
            let mut expected = Vec::new();
            for (step, gens) in call {
                self.ts = self.ts.saturating_add_signed(*step);
                // Resolve against the model as it is before this entry, apply to the model.
                let mut ops = Vec::new();
                let mut results = Vec::new();
                let mut scratch = self.model.clone();
                scratch.log_time = scratch.log_time.max(self.ts);
                for g in gens {
                    let op = resolve(&scratch, g);
                    results.push(scratch.op(&op));
                    ops.push(op);
                }
                self.model = scratch;
                entries.push(entry(self.next_index, self.ts, ops));
                expected.push(Response { results });
                self.next_index += 1;
            }
            let got = sm
                .apply(entries)
                .await
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(got, expected);
        }
        Ok(())
    }

    fn setup_calls() -> Vec<Vec<(i64, Vec<Gen>)>> {
        vec![vec![(
            0,
            vec![
                Gen::Op(Op::PutApp(app_config("a1", 0))),
                Gen::Op(Op::PutApp(app_config("a2", 1))),
            ],
        )]]
    }
}

fn entry(index: u64, ts_ms: u64, ops: Vec<Op>) -> Entry {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(Request::new(ts_ms, ops)),
    }
}

fn sorted<T: Clone, K: Ord>(mut v: Vec<T>, key: impl Fn(&T) -> K) -> Vec<T> {
    v.sort_by_key(key);
    v
}

/// Compares every read of the store with the model.
fn compare_reads(model: &Model, r: &StateReader) -> Result<(), TestCaseError> {
    let err = |e: StoreError| TestCaseError::fail(e.to_string());
    prop_assert_eq!(r.log_time_ms(), model.log_time);
    prop_assert_eq!(
        r.apps().map_err(err)?,
        model.apps.values().cloned().collect::<Vec<_>>()
    );
    prop_assert_eq!(
        r.nodes().map_err(err)?,
        model.nodes.values().cloned().collect::<Vec<_>>()
    );
    for app in APPS {
        prop_assert_eq!(r.app(app).map_err(err)?, model.apps.get(app).cloned());
        prop_assert_eq!(
            r.counters(app).map_err(err)?,
            model.counters.get(app).copied().unwrap_or_default()
        );
        for user in USERS {
            let want: Vec<Session> = model
                .sessions
                .values()
                .filter(|s| s.app == app && s.user == user)
                .cloned()
                .collect();
            prop_assert_eq!(r.sessions(app, user).map_err(err)?, want);
            for device in DEVICES {
                prop_assert_eq!(
                    r.session(app, user, device).map_err(err)?,
                    model.sessions.get(&dk(app, user, device)).cloned()
                );
            }
            let want: Vec<(String, DeviceState)> = model
                .devices
                .iter()
                .filter(|(k, _)| k.0 == app && k.1 == user)
                .map(|(k, d)| (k.2.clone(), d.clone()))
                .collect();
            prop_assert_eq!(r.devices(app, user).map_err(err)?, want);
            for device in DEVICES {
                prop_assert_eq!(
                    r.kept_session(app, user, device).map_err(err)?,
                    model.kept_sessions.get(&dk(app, user, device)).cloned()
                );
            }
            let key = uk(app, user);
            prop_assert_eq!(
                r.mailbox_meta(app, user).map_err(err)?,
                model.mail_meta.get(&key).cloned()
            );
            let held: Vec<StoredMessage> = model
                .mail
                .get(&key)
                .map(|m| m.values().cloned().collect())
                .unwrap_or_default();
            prop_assert_eq!(r.mailbox_since(app, user, 0, 1000).map_err(err)?, held.clone());
            if held.len() > 1 {
                prop_assert_eq!(
                    r.mailbox_since(app, user, held[0].seq, 1).map_err(err)?,
                    vec![held[1].clone()]
                );
            }
        }
        for topic in TOPICS {
            let key = uk(app, topic);
            prop_assert_eq!(
                r.topic_meta(app, topic).map_err(err)?,
                model.topic_meta.get(&key).cloned()
            );
            let held: Vec<TopicMessage> = model
                .topics
                .get(&key)
                .map(|m| m.values().cloned().collect())
                .unwrap_or_default();
            prop_assert_eq!(r.topic_since(app, topic, 0, 1000).map_err(err)?, held);
            prop_assert_eq!(
                r.retained(app, topic).map_err(err)?,
                model.retained.get(&key).cloned()
            );
        }
        let retained: Vec<(String, RetainedMessage)> = model
            .retained
            .iter()
            .filter(|((a, _), _)| a == app)
            .map(|((_, t), m)| (t.clone(), m.clone()))
            .collect();
        prop_assert_eq!(r.retained_page(app, None, 1000).map_err(err)?, retained.clone());
        if let Some((first, _)) = retained.first() {
            prop_assert_eq!(
                r.retained_page(app, Some(first), 1).map_err(err)?,
                retained.get(1).cloned().into_iter().collect::<Vec<_>>()
            );
        }
        for msg_id in MSG_IDS {
            let mut want: Vec<(String, u64)> = model
                .kept
                .iter()
                .filter(|(a, m, _, _)| a == app && m == msg_id)
                .map(|(_, _, user, seq)| (user.clone(), *seq))
                .collect();
            for ((a, user), held) in &model.mail {
                if a == app {
                    want.extend(
                        held.values()
                            .filter(|m| m.msg_id == msg_id)
                            .map(|m| (user.clone(), m.seq)),
                    );
                }
            }
            let got = sorted(r.msg_locations(app, msg_id).map_err(err)?, |l| l.clone());
            prop_assert_eq!(got, sorted(want, |l| l.clone()));
        }
    }
    for node in 1..4u64 {
        let want: Vec<Session> = model
            .sessions
            .values()
            .filter(|s| s.node == node)
            .cloned()
            .collect();
        prop_assert_eq!(r.sessions_on_node(node).map_err(err)?, want);
    }
    prop_assert_eq!(
        r.events_since(0, 100_000).map_err(err)?,
        model.outbox.values().cloned().collect::<Vec<_>>()
    );
    prop_assert_eq!(r.archive_state().map_err(err)?, model.archive_state);
    let archived: Vec<ArchivedMessage> = model.archive.values().cloned().collect();
    prop_assert_eq!(r.archive_since(0, 100_000).map_err(err)?, archived.clone());
    if archived.len() > 1 {
        prop_assert_eq!(
            r.archive_since(archived[0].id, 1).map_err(err)?,
            vec![archived[1].clone()]
        );
    }
    Ok(())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn fail(e: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(e.to_string())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn store_matches_model(calls in gen_calls(40)) {
        runtime().block_on(async {
            let dir = TempDir::new().map_err(fail)?;
            let recorder = Arc::new(Recorder::default());
            let mut sm = StateMachine::open(dir.path(), recorder.clone()).map_err(fail)?;
            let mut run = Run::new();
            run.drive(&mut sm, &Run::setup_calls()).await?;
            run.drive(&mut sm, &calls).await?;
            compare_reads(&run.model, &sm.reader())?;
            let heard = recorder.0.lock().clone();
            prop_assert_eq!(heard, (1..run.next_index).collect::<Vec<_>>());
            prop_assert_eq!(sm.reader().applied_index(), run.next_index - 1);

            // Reopen: the same state comes back.
            let hash = sm.reader().state_hash().map_err(fail)?;
            drop(sm);
            let sm = StateMachine::open(dir.path(), Arc::new(NoObserver)).map_err(fail)?;
            prop_assert_eq!(sm.reader().state_hash().map_err(fail)?, hash);
            compare_reads(&run.model, &sm.reader())?;
            Ok(())
        })?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    #[test]
    fn snapshot_install_continues_like_model(first in gen_calls(25), second in gen_calls(25)) {
        runtime().block_on(async {
            let dir = TempDir::new().map_err(fail)?;
            let mut a = StateMachine::open(&dir.path().join("a"), Arc::new(NoObserver)).map_err(fail)?;
            let mut run = Run::new();
            run.drive(&mut a, &Run::setup_calls()).await?;
            run.drive(&mut a, &first).await?;
            let snap = a.get_snapshot_builder().await.build_snapshot().await.map_err(fail)?;
            prop_assert_eq!(snap.meta.last_log_id.map(|l| l.index), Some(run.next_index - 1));

            // A fresh state machine receives it (the files live in a's dir, as in openraft's
            // transfer test) and continues from there.
            let mut b = StateMachine::open(&dir.path().join("b"), Arc::new(NoObserver)).map_err(fail)?;
            let _incoming = b.begin_receiving_snapshot().await.map_err(fail)?;
            b.install_snapshot(&snap.meta, snap.snapshot.clone()).await.map_err(fail)?;
            prop_assert_eq!(
                b.reader().state_hash().map_err(fail)?,
                a.reader().state_hash().map_err(fail)?
            );
            compare_reads(&run.model, &b.reader())?;
            let current = b.get_current_snapshot().await.map_err(fail)?.map(|s| s.meta);
            prop_assert_eq!(current, Some(snap.meta.clone()));

            // Both continue with the same entries and stay identical.
            let mut run_a = Run { model: run.model.clone(), next_index: run.next_index, ts: run.ts };
            run.drive(&mut b, &second).await?;
            run_a.drive(&mut a, &second).await?;
            compare_reads(&run.model, &b.reader())?;
            prop_assert_eq!(
                b.reader().state_hash().map_err(fail)?,
                a.reader().state_hash().map_err(fail)?
            );
            Ok(())
        })?;
    }
}

/// Issue 26: a registration that commits after its HELLO failed (proposed when the device had no
/// session) must not replace the login that followed it; one proposed by a node that saw that
/// login does replace it (newest wins).
#[test]
fn a_late_registration_never_replaces_the_login_that_followed_it() {
    runtime().block_on(async {
        let dir = TempDir::new().unwrap();
        let mut sm = StateMachine::open(dir.path(), Arc::new(NoObserver)).unwrap();
        let reg = |conn: u64| Register {
            app: "a1".into(),
            user: "u".into(),
            device: "d".into(),
            platform: "ios".into(),
            node: 1,
            conn,
            session: 1,
        };
        let seen = |conn: u64, seen_epoch: u64| Op::RegisterSeen {
            register: reg(conn),
            seen_epoch,
        };
        let got = sm
            .apply(vec![
                entry(1, 1_000, vec![Op::PutApp(app_config("a1", 0))]),
                // The newer login (on node 2's view: no session yet) commits first.
                entry(2, 1_001, vec![seen(20, 0)]),
                // The late one, proposed before that login existed, commits after it.
                entry(3, 1_002, vec![seen(10, 0)]),
            ])
            .await
            .unwrap();
        let newer = match &got[1].results[0] {
            OpResult::Registered(r) => r.epoch,
            other => panic!("{other:?}"),
        };
        assert_eq!(got[2].results[0], OpResult::Superseded { epoch: newer });
        let s = sm.reader().session("a1", "u", "d").unwrap().unwrap();
        assert_eq!((s.conn, s.epoch), (20, newer));
        // A login proposed by a node that saw the current session wins.
        let got = sm
            .apply(vec![entry(4, 1_003, vec![seen(30, newer)])])
            .await
            .unwrap();
        let newest = match &got[0].results[0] {
            OpResult::Registered(r) => r.epoch,
            other => panic!("{other:?}"),
        };
        assert!(newest > newer);
        let s = sm.reader().session("a1", "u", "d").unwrap().unwrap();
        assert_eq!((s.conn, s.epoch), (30, newest));
    });
}

/// A kept session (MQTT's persistent session): started in its registration's entry, taken over by
/// a login of the device on another node (Session Present, its subscriptions), never changed by
/// the connection it replaced, and removed once its expiry passed after its session ended.
#[test]
fn a_kept_session_is_fenced_by_its_epoch_and_expires_after_its_session() {
    runtime().block_on(async {
        let dir = TempDir::new().unwrap();
        let mut sm = StateMachine::open(dir.path(), Arc::new(NoObserver)).unwrap();
        let login = |node: u64, conn: u64, seen_epoch: u64, clean: bool| {
            vec![
                Op::RegisterSeen {
                    register: Register {
                        app: "a1".into(),
                        user: "u".into(),
                        device: "d".into(),
                        platform: "mqtt".into(),
                        node,
                        conn,
                        session: 1,
                    },
                    seen_epoch,
                },
                Op::SessionStart(SessionStart {
                    app: "a1".into(),
                    user: "u".into(),
                    device: "d".into(),
                    node,
                    conn,
                    session: 1,
                    clean,
                    expiry_s: 5,
                }),
            ]
        };
        let subs = |epoch: u64, change: SubsChange| Op::SessionSubs {
            app: "a1".into(),
            user: "u".into(),
            device: "d".into(),
            epoch,
            change,
        };
        let epoch_of = |r: &OpResult| match r {
            OpResult::Registered(r) => r.epoch,
            other => panic!("{other:?}"),
        };
        let t1 = KeptSubscription {
            filter: "t1".into(),
            options: 9,
        };
        let got = sm
            .apply(vec![
                entry(1, 1_000, vec![Op::PutApp(app_config("a1", 0))]),
                entry(2, 1_001, login(1, 10, 0, false)),
            ])
            .await
            .unwrap();
        let first = epoch_of(&got[1].results[0]);
        assert_eq!(
            got[1].results[1],
            OpResult::Kept {
                present: false,
                subscriptions: vec![]
            }
        );
        let got = sm
            .apply(vec![
                entry(
                    3,
                    1_002,
                    vec![subs(first, SubsChange::Subscribe(vec![t1.clone()]))],
                ),
                // The device logs in on node 2 while node 1 still holds the session.
                entry(4, 1_003, login(2, 20, first, false)),
            ])
            .await
            .unwrap();
        assert_eq!(got[0].results, vec![OpResult::Done]);
        let second = epoch_of(&got[1].results[0]);
        assert_eq!(
            got[1].results[1],
            OpResult::Kept {
                present: true,
                subscriptions: vec![t1.clone()]
            }
        );
        // The replaced connection's UNSUBSCRIBE commits late: fenced.
        let got = sm
            .apply(vec![entry(
                5,
                1_004,
                vec![subs(first, SubsChange::Unsubscribe(vec!["t1".into()]))],
            )])
            .await
            .unwrap();
        assert_eq!(got[0].results, vec![OpResult::Superseded { epoch: second }]);
        let kept = sm.reader().kept_session("a1", "u", "d").unwrap().unwrap();
        assert_eq!(
            (kept.epoch, kept.expires_ms, kept.subscriptions),
            (second, 0, vec![t1])
        );
        // The session ends: kept 5 s more by log time, then expired.
        let got = sm
            .apply(vec![
                entry(
                    6,
                    2_000,
                    vec![Op::Unregister {
                        app: "a1".into(),
                        user: "u".into(),
                        device: "d".into(),
                        epoch: second,
                    }],
                ),
                entry(7, 6_999, vec![Op::Expire { max: 10 }]),
            ])
            .await
            .unwrap();
        assert_eq!(
            got[1].results,
            vec![OpResult::Expired {
                messages: 0,
                topic_entries: 0,
                keys: 0
            }]
        );
        assert_eq!(
            sm.reader()
                .kept_session("a1", "u", "d")
                .unwrap()
                .map(|k| k.expires_ms),
            Some(7_000)
        );
        let got = sm
            .apply(vec![entry(8, 7_000, vec![Op::Expire { max: 10 }])])
            .await
            .unwrap();
        assert_eq!(
            got[0].results,
            vec![OpResult::Expired {
                messages: 0,
                topic_entries: 0,
                keys: 1
            }]
        );
        assert_eq!(sm.reader().kept_session("a1", "u", "d").unwrap(), None);
    });
}
