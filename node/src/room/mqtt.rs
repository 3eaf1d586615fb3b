//! MQTT 3.1.1 / 5.0 transport: an MQTT connection seen as the byte stream the client protocol
//! runs on, so `conn::serve` handles it like TCP, TLS and WebSocket (docs/MQTT.md).
//!
//! [`MqttStream`] sits between the socket and the connection task and translates, one session
//! per connection (session id 1):
//!
//! | client → node | becomes | node → client | becomes |
//! |---|---|---|---|
//! | CONNECT (user name = app, password = token, client id = device) | HELLO | WELCOME / ERROR | CONNACK |
//! | PUBACK | ACK (cumulative, once every earlier inbox message is acked) | PUSH (mailbox) | PUBLISH `$herald/inbox`, QoS of the push, 5.0: Message Expiry Interval = the TTL left |
//! | PUBLISH `$herald/upstream` | UPSTREAM | UPSTREAM_REPLY | PUBACK (QoS 1) |
//! | PUBLISH other topic (RETAIN: `retain`, 5.0 Message Expiry Interval: `retain_ttl_ms`) | PUBLISH_TOPIC | TOPIC_PUBLISHED | PUBACK (QoS 1) |
//! | SUBSCRIBE topic or filter (`+`, `#`) | SUBSCRIBE (+ a PING marker, then GET_RETAINED per Retain Handling) | SUBSCRIBED + PONG, PUSH (RETAIN_STORED) | SUBACK, PUBLISH RETAIN 1 |
//! | UNSUBSCRIBE | UNSUBSCRIBE (+ a PING marker) | PONG | UNSUBACK |
//! | PINGREQ | PING | PONG | PINGRESP |
//! | DISCONNECT | CLOSE_SESSION (5.0: with its Session Expiry Interval) | KICKED / BYE | DISCONNECT (5.0), close |
//!
//! A CONNECT's Clean Start / Clean Session and Session Expiry Interval become HELLO's `keep`: the
//! node keeps the session's subscriptions (with their options) in the replicated store, and
//! WELCOME says whether the device had a kept session (CONNACK's Session Present) and which
//! subscriptions it continues with (`subs.rs` tracks them here, for the retain options).
//!
//! MQTT 5.0 topic aliases live here, per connection, in both directions: a client's alias is
//! resolved before its PUBLISH is translated, and the node's own aliases are put on the PUBLISHes
//! it sends (docs/MQTT.md, "Topic aliases").
//!
//! Every reply the node sends goes through the connection task's own writes; only a refusal of
//! the translator's own (a protocol error) is written here, before the stream reports EOF.
//! Nothing here buffers without bound: the read side holds at most one MQTT packet
//! (`max_packet`) and what one read produced; the write side holds what the connection task wrote
//! in one batch.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::num::NonZeroU16;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BytesMut};
use herald_mqtt::{
    Ack, ConnAck, Connect, DecodeError, Disconnect, Packet, Properties, Publish, QoS, ReasonCode, SubAck,
    Subscribe, UnsubAck, Unsubscribe, Version,
};
use herald_proto::client::{self as pc, frame::Kind, ErrorCode, Frame, KickReason};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tracing::{debug, info};

use super::{BROADCAST, MAX_NAME};

mod subs;

/// The topic a user's mailbox (unicast pushes) arrives on.
pub const INBOX: &str = "$herald/inbox";
/// The topic the app's broadcasts arrive on (Herald's `*`).
pub const BROADCAST_TOPIC: &str = "$herald/broadcast";
/// The topic a client publishes to for the app's backend (the native UPSTREAM).
pub const UPSTREAM: &str = "$herald/upstream";
/// The session id of the one Herald session of an MQTT connection.
const SID: u32 = 1;
/// Marker kinds in the top byte of a native PING id (see [`MqttStream::marker`]).
const MARK_PING: u64 = 1;
const MARK_SUBACK: u64 = 2;
const MARK_UNSUBACK: u64 = 3;
/// Topic aliases a 5.0 client may set towards the node (its CONNACK's Topic Alias Maximum). Each
/// holds a topic name of at most [`MAX_NAME`] bytes, so a connection's inbound map stays small.
pub const TOPIC_ALIAS_MAX: u16 = 32;
/// Most topic aliases the node sets towards a 5.0 client (fewer if the client's CONNECT allows
/// fewer): the first topics it sends get one, later ones are sent by name.
pub const OUT_ALIAS_MAX: u16 = 32;

/// Limits of the MQTT side, from the node's configuration.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest MQTT packet accepted (and announced as Maximum Packet Size in 5.0).
    pub max_packet: usize,
    /// Largest native frame the connection task accepts.
    pub max_frame: usize,
    /// The node's client heartbeat bounds (ms): keep alive is clamped into them.
    pub heartbeat_min_ms: u64,
    pub heartbeat_max_ms: u64,
}

/// A SUBSCRIBE waiting for its native answers.
struct PendingSub {
    packet_id: NonZeroU16,
    /// One reason per filter; `None` until the node answered that topic.
    reasons: Vec<Option<ReasonCode>>,
    /// Filter index by native topic, for the answers still missing.
    waiting: HashMap<String, usize>,
    /// The PING marker after the SUBSCRIBEs came back.
    marked: bool,
}

/// What the translator knows about the session.
#[derive(Default)]
struct State {
    version: Option<Version>,
    /// CONNACK sent.
    connected: bool,
    /// The client identifier we assigned (empty client id with a clean start).
    assigned_id: Option<String>,
    /// Keep alive the client asked for, and what the node will enforce (seconds).
    keep_alive: u16,
    server_keep_alive: Option<u16>,
    next_packet_id: u16,
    /// Outbound QoS 1 inbox publishes not PUBACKed yet: packet id → mailbox seq.
    inflight: BTreeMap<u16, u64>,
    /// Mailbox seqs handed to the client and not acked yet.
    unacked: BTreeSet<u64>,
    /// Highest mailbox seq handed to the client (or passed over by a gap).
    max_sent: u64,
    /// Highest seq acked to the node (the native ACK is cumulative).
    acked: u64,
    /// Inbox seqs up to this one may have been sent by an earlier connection of the device
    /// (WELCOME's `redelivery_upto`): their PUBLISH has DUP set.
    redelivery_upto: u64,
    broadcast: bool,
    /// The session's subscriptions and their options (see `subs.rs`).
    filters: subs::Filters,
    /// The session is kept beyond the connection (a Session Expiry Interval above 0, or 3.1.1's
    /// Clean Session 0): a DISCONNECT's Session Expiry Interval is passed on.
    kept: bool,
    subs: Vec<PendingSub>,
    /// UNSUBSCRIBEs waiting for their marker: packet id and filter count, oldest first.
    unsubs: std::collections::VecDeque<(NonZeroU16, usize)>,
    next_marker: u64,
    next_request: u64,
    /// Upstream requests: request id → the PUBLISH's packet id and QoS (1 or 2).
    upstream: HashMap<u64, (NonZeroU16, QoS)>,
    /// Client publishes to topics: request id → the PUBLISH's packet id and QoS (1 or 2).
    publishes: HashMap<u64, (NonZeroU16, QoS)>,
    /// 3.1.1 QoS 2 publishes received and not released (PUBREL) yet: packet id → PUBREC sent.
    qos2: HashMap<u16, bool>,
    /// The app (CONNECT's user name) and the will (topic, payload), published when the connection
    /// ends any way but a normal DISCONNECT once the session was accepted.
    app: String,
    will: Option<Box<WillMsg>>,
    /// 5.0 topic aliases of this connection (both directions); allocated on first use.
    aliases: Option<Box<Aliases>>,
    /// The Topic Alias Maximum the client's CONNECT allowed the node (capped at [`OUT_ALIAS_MAX`]).
    out_alias_max: u16,
    /// The client's Maximum Packet Size (5.0 CONNECT): a PUBLISH larger than it is not sent.
    out_max_packet: Option<u32>,
    /// Cluster time (ms) read for the batch of frames being translated (message expiry).
    now_ms: Option<u64>,
}

/// A client's will and what deciding when (and whether) to publish it needs.
struct WillMsg {
    topic: String,
    payload: bytes::Bytes,
    /// The will's retain flag, and its Message Expiry Interval (5.0; seconds, 0: none), which
    /// bounds how long it stays the topic's retained message.
    retain: bool,
    expiry_s: u32,
    /// Will Delay Interval (5.0), seconds: 0 publishes as soon as the connection ends.
    delay_s: u32,
    /// The session's expiry interval (5.0: CONNECT's, changed by DISCONNECT's), seconds: a will
    /// goes out when the session ends if that comes before its delay [MQTT-3.1.3-9].
    session_expiry_s: u32,
    /// Who the session is (the token's user, the client id) and when the device last registered
    /// (log time, read at WELCOME): a later registration means the client id came back.
    user: String,
    device: String,
    registered_ms: u64,
}

/// How long after the connection ends a will goes out: its delay, unless the session (which
/// ends with the connection when its expiry interval is 0) ends first. 3.1.1 has neither: 0.
fn will_delay_s(delay_s: u32, session_expiry_s: u32) -> u32 {
    delay_s.min(session_expiry_s)
}

/// Delayed wills one node holds at once; past it, a will is published when its connection ends.
const MAX_DELAYED_WILLS: u64 = 10_000;

/// A connection's topic aliases (5.0 §3.3.2.3.4): they live as long as the network connection.
#[derive(Default)]
struct Aliases {
    /// Set by the client: alias → topic name.
    inbound: HashMap<u16, String>,
    /// Set by the node: topic name → alias, for the first topics it sent.
    outbound: HashMap<String, u16>,
}

/// An MQTT connection as the client protocol's byte stream (see the module docs).
pub struct MqttStream<S> {
    inner: S,
    limits: Limits,
    /// Where a will is committed (none in unit tests).
    room: Option<std::sync::Arc<super::Room>>,
    /// MQTT bytes read from the socket, not a whole packet yet.
    rbuf: BytesMut,
    /// Native frames for the connection task.
    native_in: BytesMut,
    /// Native bytes the connection task wrote, not a whole frame yet.
    native_out: BytesMut,
    /// MQTT bytes for the socket.
    wbuf: BytesMut,
    /// The socket ended, or the translator ends the connection: after `native_in` and `wbuf`
    /// are drained, reads return EOF.
    eof: bool,
    st: State,
}

impl<S> MqttStream<S> {
    pub fn new(inner: S, limits: Limits) -> Self {
        MqttStream {
            inner,
            limits,
            room: None,
            rbuf: BytesMut::new(),
            native_in: BytesMut::new(),
            native_out: BytesMut::new(),
            wbuf: BytesMut::new(),
            eof: false,
            st: State::default(),
        }
    }

    /// Lets the stream commit the client's will through `room` when the connection ends.
    pub fn with_room(mut self, room: std::sync::Arc<super::Room>) -> Self {
        self.room = Some(room);
        self
    }

    fn send_node(&mut self, kind: Kind) {
        herald_proto::frame::encode(&Frame { kind: Some(kind) }, &mut self.native_in);
    }

    /// Appends `p` for the client; false if it could not be encoded (and was dropped).
    fn send_client(&mut self, p: &Packet) -> bool {
        let v = self.st.version.unwrap_or(Version::V311);
        match herald_mqtt::encode(p, v, &mut self.wbuf) {
            Ok(()) => true,
            Err(e) => {
                // Only packets built here are encoded; one the version cannot carry is a bug here.
                debug!(error = %e, ?v, "mqtt: packet not encodable; dropped");
                false
            }
        }
    }

    /// A native PING whose PONG stands for `kind`'s answer.
    fn marker(&mut self, kind: u64, value: u64) {
        self.st.next_marker += 1;
        let id = (kind << 56) | ((value & 0xffff) << 32) | (self.st.next_marker & 0xffff_ffff);
        self.send_node(Kind::Ping(pc::Ping { id, interval_ms: 0 }));
    }

    /// Ends the connection: a 5.0 client is told why (`reason`), a 3.1.1 client is just closed.
    fn close_with(&mut self, reason: ReasonCode, why: &str) {
        debug!(?reason, why, "mqtt: closing the connection");
        match (self.st.version, self.st.connected) {
            (Some(Version::V5), true) => {
                let d = Disconnect {
                    reason,
                    properties: Properties {
                        reason_string: Some(why.to_string()),
                        ..Properties::default()
                    },
                };
                self.send_client(&Packet::Disconnect(d));
            }
            (Some(v), false) => {
                let reason = if v == Version::V311 {
                    v311_connack_code(reason)
                } else {
                    reason
                };
                self.send_client(&Packet::ConnAck(ConnAck {
                    session_present: false,
                    reason,
                    properties: Properties::default(),
                }));
            }
            _ => {}
        }
        self.eof = true;
    }

    fn decode_error(&mut self, e: DecodeError) {
        info!(error = %e, "mqtt: bad packet from the client");
        self.close_with(e.reason_code(), &e.to_string());
    }

    // --- client → node -------------------------------------------------------------------------

    fn on_packet(&mut self, p: Packet) {
        match p {
            Packet::Connect(c) => self.on_connect(c),
            Packet::Publish(p) => self.on_publish(p),
            Packet::PubAck(a) => self.on_puback(a),
            Packet::Subscribe(s) => self.on_subscribe(s),
            Packet::Unsubscribe(u) => self.on_unsubscribe(u),
            Packet::PingReq => self.marker(MARK_PING, 0),
            Packet::Disconnect(d) => {
                // A normal DISCONNECT discards the will; 5.0's 0x04 asks for it all the same.
                if d.reason != ReasonCode::DISCONNECT_WITH_WILL_MESSAGE {
                    self.st.will = None;
                }
                // 5.0's DISCONNECT may change when the session ends (not from 0: that is a
                // protocol error, ignored here).
                if let (Some(w), Some(e)) = (&mut self.st.will, d.properties.session_expiry_interval) {
                    if w.session_expiry_s > 0 {
                        w.session_expiry_s = e;
                    }
                }
                // A kept session may get a new expiry (not from 0: that is a protocol error [MQTT-3.14.2-2],
                // ignored here).
                let expiry_s = d.properties.session_expiry_interval.filter(|_| self.st.kept);
                self.send_node(Kind::CloseSession(pc::CloseSession {
                    session_id: SID,
                    expiry_s,
                }));
                self.eof = true;
            }
            Packet::PubRel(r) if self.st.version == Some(Version::V311) => {
                // The publish was handed on when it arrived; release ends its exchange.
                self.st.qos2.remove(&r.packet_id.get());
                self.send_client(&Packet::PubComp(Ack {
                    packet_id: r.packet_id,
                    reason: ReasonCode::SUCCESS,
                    properties: Properties::default(),
                }));
            }
            Packet::PubRec(_) | Packet::PubRel(_) | Packet::PubComp(_) => self.close_with(
                ReasonCode::QOS_NOT_SUPPORTED,
                "QoS 2 is not supported (the CONNACK's Maximum QoS is 1)",
            ),
            Packet::Auth(_) => self.close_with(
                ReasonCode::BAD_AUTHENTICATION_METHOD,
                "enhanced authentication is not supported; send the token as the password",
            ),
            other => self.close_with(
                ReasonCode::PROTOCOL_ERROR,
                &format!("a client must not send {:?}", other.packet_type()),
            ),
        }
    }

    fn on_connect(&mut self, c: Connect) {
        self.st.version = Some(c.version);
        self.st.keep_alive = c.keep_alive;
        // 0 or absent: the node must not send topic aliases [MQTT-3.1.2-26].
        self.st.out_alias_max = c.properties.topic_alias_maximum.unwrap_or(0).min(OUT_ALIAS_MAX);
        self.st.out_max_packet = c.properties.maximum_packet_size;
        let mut device = c.client_id.clone();
        if device.is_empty() {
            if !c.clean_start {
                return self.close_with(
                    ReasonCode::CLIENT_IDENTIFIER_NOT_VALID,
                    "a persistent session needs a client identifier (the device id)",
                );
            }
            device = format!("mqtt-{:016x}", rand::random::<u64>());
            self.st.assigned_id = Some(device.clone());
        }
        if device.len() > MAX_NAME {
            return self.close_with(
                ReasonCode::CLIENT_IDENTIFIER_NOT_VALID,
                &format!("the client identifier (the device id) must be at most {MAX_NAME} bytes"),
            );
        }
        let (Some(app), Some(password)) = (c.user_name.clone(), c.password.clone()) else {
            return self.close_with(
                ReasonCode::BAD_USER_NAME_OR_PASSWORD,
                "the user name must be the app id and the password a Herald client token",
            );
        };
        let Ok(token) = String::from_utf8(password.to_vec()) else {
            return self.close_with(ReasonCode::BAD_USER_NAME_OR_PASSWORD, "the token is not UTF-8");
        };
        // The user is the token's subject; the node checks the rest of the token itself.
        let Ok(user) = crate::token::peek(&token).map(|c| c.sub) else {
            return self.close_with(
                ReasonCode::BAD_USER_NAME_OR_PASSWORD,
                "the password is not a Herald client token (a JWT)",
            );
        };
        self.st.app = app.clone();
        // How long the session outlives the connection: 5.0 says, 3.1.1's Clean Session 0 is
        // for ever, Clean Session 1 not at all.
        let expiry_s = match c.version {
            Version::V5 => c.properties.session_expiry_interval.unwrap_or(0),
            Version::V311 if c.clean_start => 0,
            Version::V311 => herald_raft::KEPT_FOREVER,
        };
        self.st.kept = expiry_s > 0;
        if let Some(w) = &c.will {
            self.st.will = Some(Box::new(WillMsg {
                topic: w.topic.clone(),
                payload: w.payload.clone(),
                retain: w.retain,
                expiry_s: w.properties.message_expiry_interval.unwrap_or(0),
                delay_s: w.properties.will_delay_interval.unwrap_or(0),
                session_expiry_s: c.properties.session_expiry_interval.unwrap_or(0),
                user: user.clone(),
                device: device.clone(),
                registered_ms: 0,
            }));
        }
        let heartbeat_ms = if c.keep_alive == 0 {
            // No keep alive: the longest heartbeat the node allows (an idle limit of 2.5 of it).
            self.limits.heartbeat_max_ms.min(u64::from(u32::MAX)) as u32
        } else {
            // The node closes a connection silent for 2.5 heartbeats; MQTT allows 1.5 keep alives.
            let want = u64::from(c.keep_alive) * 1000 * 3 / 5;
            let got = want.clamp(self.limits.heartbeat_min_ms, self.limits.heartbeat_max_ms);
            if got != want {
                let ka = (got * 5 / 3).div_ceil(1000).min(u64::from(u16::MAX)) as u16;
                self.st.server_keep_alive = Some(ka);
            }
            got as u32
        };
        self.send_node(Kind::Hello(pc::Hello {
            version: herald_proto::PROTOCOL_VERSION,
            client: "mqtt".into(),
            heartbeat_ms,
            session: Some(pc::OpenSession {
                session_id: SID,
                app,
                user,
                device,
                platform: "mqtt".into(),
                token,
                last_acked_seq: 0,
                topics: vec![],
                keep: Some(pc::Keep {
                    clean: c.clean_start,
                    expiry_s,
                }),
            }),
        }));
    }

    fn on_publish(&mut self, p: Publish) {
        if p.qos == QoS::ExactlyOnce {
            // 5.0 was told Maximum QoS 1 [MQTT-3.2.2-11]. 3.1.1 has no way to say it, so its
            // QoS 2 publishes are taken exactly once: handed on when first received, PUBREC
            // once the node answered, a retransmission before PUBREL handed on no second time.
            if self.st.version != Some(Version::V311) {
                return self.close_with(
                    ReasonCode::QOS_NOT_SUPPORTED,
                    "QoS 2 is not supported (the CONNACK's Maximum QoS is 1)",
                );
            }
            let Some(pid) = p.packet_id else { return };
            match self.st.qos2.get(&pid.get()) {
                Some(true) => {
                    self.send_client(&Packet::PubRec(Ack {
                        packet_id: pid,
                        reason: ReasonCode::SUCCESS,
                        properties: Properties::default(),
                    }));
                    return;
                }
                Some(false) => return,
                None => {
                    self.st.qos2.insert(pid.get(), false);
                }
            }
        }
        let Some(topic) = self.resolve_alias(&p) else {
            return;
        };
        let p = Publish { topic, ..p };
        if p.topic == UPSTREAM {
            self.st.next_request += 1;
            let id = self.st.next_request;
            if let Some(pid) = p.packet_id {
                self.st.upstream.insert(id, (pid, p.qos));
            }
            self.send_node(Kind::Upstream(pc::Upstream {
                session_id: SID,
                request_id: id,
                payload: p.payload,
            }));
            return;
        }
        // A Herald topic: the node checks the app lets clients publish there.
        self.st.next_request += 1;
        let id = self.st.next_request;
        if let Some(pid) = p.packet_id {
            self.st.publishes.insert(id, (pid, p.qos));
        }
        // A retained message expires with the PUBLISH's Message Expiry Interval (5.0).
        let retain_ttl_ms = match (p.retain, p.properties.message_expiry_interval) {
            (true, Some(s)) => u64::from(s) * 1000,
            _ => 0,
        };
        self.send_node(Kind::PublishTopic(pc::PublishTopic {
            session_id: SID,
            request_id: id,
            topic: p.topic,
            payload: p.payload,
            retain: p.retain,
            retain_ttl_ms,
        }));
    }

    /// The topic name of a client's PUBLISH: its own, which also (re)sets its Topic Alias if it
    /// carries one, or the one its alias stands for. `None` when the connection is being closed:
    /// an alias above the CONNACK's Topic Alias Maximum (0x94 [MQTT-3.3.2-9]), an empty name with
    /// an alias never set (0x82, a protocol error: the codec already refuses an empty name
    /// without an alias), or a name no Herald topic can have set as an alias.
    fn resolve_alias(&mut self, p: &Publish) -> Option<String> {
        let Some(alias) = p.properties.topic_alias else {
            return Some(p.topic.clone());
        };
        if alias == 0 || alias > TOPIC_ALIAS_MAX {
            self.close_with(
                ReasonCode::TOPIC_ALIAS_INVALID,
                &format!(
                    "topic alias {alias} is not in 1..={TOPIC_ALIAS_MAX} (the CONNACK's Topic Alias Maximum)"
                ),
            );
            return None;
        }
        let aliases = self.st.aliases.get_or_insert_with(Box::default);
        if p.topic.is_empty() {
            let topic = aliases.inbound.get(&alias).cloned();
            if topic.is_none() {
                self.close_with(
                    ReasonCode::PROTOCOL_ERROR,
                    &format!("topic alias {alias} was never set on this connection"),
                );
            }
            return topic;
        }
        if p.topic.len() > MAX_NAME {
            // No Herald topic has such a name (the publish would be refused); not kept, so an
            // inbound map holds at most TOPIC_ALIAS_MAX short names.
            self.close_with(
                ReasonCode::TOPIC_NAME_INVALID,
                &format!("a topic alias may only stand for a name of at most {MAX_NAME} bytes"),
            );
            return None;
        }
        aliases.inbound.insert(alias, p.topic.clone());
        Some(p.topic.clone())
    }

    /// Gives an outbound PUBLISH a topic alias when the client allows them: the first PUBLISH of
    /// a topic carries its name and a new alias, later ones the alias and an empty name. Once the
    /// client's maximum is used up, new topics go by name (no alias is ever re-mapped).
    /// Returns the topic whose alias this PUBLISH sets, if it sets one: should the PUBLISH not
    /// go out, the caller takes the alias back ([`Self::unalias`]), or the client would get
    /// the alias without its name.
    fn alias_outbound(&mut self, publish: &mut Publish) -> Option<String> {
        if self.st.out_alias_max == 0 || self.st.version != Some(Version::V5) {
            return None;
        }
        let max = self.st.out_alias_max;
        let aliases = self.st.aliases.get_or_insert_with(Box::default);
        if let Some(&alias) = aliases.outbound.get(&publish.topic) {
            publish.topic.clear();
            publish.properties.topic_alias = Some(alias);
            None
        } else if aliases.outbound.len() < usize::from(max) {
            let alias = aliases.outbound.len() as u16 + 1;
            aliases.outbound.insert(publish.topic.clone(), alias);
            publish.properties.topic_alias = Some(alias);
            Some(publish.topic.clone())
        } else {
            None
        }
    }

    /// Takes back the alias just set for `topic` (the newest, so the next topic gets its number).
    fn unalias(&mut self, topic: &str) {
        if let Some(a) = &mut self.st.aliases {
            a.outbound.remove(topic);
        }
    }

    fn on_puback(&mut self, a: Ack) {
        let Some(seq) = self.st.inflight.remove(&a.packet_id.get()) else {
            debug!(packet_id = a.packet_id, "mqtt: PUBACK for no message in flight");
            return;
        };
        self.st.unacked.remove(&seq);
        self.ack_upto();
    }

    /// Acks to the node every seq below the oldest one the client still holds.
    fn ack_upto(&mut self) {
        let upto = match self.st.unacked.first() {
            Some(first) => first.saturating_sub(1),
            None => self.st.max_sent,
        };
        if upto > self.st.acked {
            self.st.acked = upto;
            self.send_node(Kind::Ack(pc::Ack {
                session_id: SID,
                seq: upto,
            }));
        }
    }

    fn on_subscribe(&mut self, s: Subscribe) {
        let v5 = self.st.version == Some(Version::V5);
        let refuse = |code: ReasonCode| if v5 { code } else { ReasonCode::UNSPECIFIED_ERROR };
        let mut pending = PendingSub {
            packet_id: s.packet_id,
            reasons: Vec::with_capacity(s.subscriptions.len()),
            waiting: HashMap::new(),
            marked: false,
        };
        let mut native = Vec::new();
        let mut retained = Vec::new();
        for (i, sub) in s.subscriptions.iter().enumerate() {
            let f = sub.filter.as_str();
            let granted_1 = if sub.options.qos == QoS::AtMostOnce {
                ReasonCode::GRANTED_QOS_0
            } else {
                ReasonCode::GRANTED_QOS_1
            };
            let options = subs::encode_options(&sub.options);
            let r = if f.starts_with("$share/") {
                Some(refuse(ReasonCode::SHARED_SUBSCRIPTIONS_NOT_SUPPORTED))
            } else if f == INBOX {
                Some(granted_1)
            } else if f == BROADCAST_TOPIC || f == BROADCAST {
                // The node's `*`, always on there; subscribed natively so a kept session keeps it.
                self.st.broadcast = true;
                self.st.filters.insert(BROADCAST_TOPIC, sub.options);
                pending.waiting.insert(BROADCAST.to_string(), i);
                native.push((BROADCAST.to_string(), options));
                None
            } else if f.starts_with('$') {
                Some(refuse(ReasonCode::TOPIC_FILTER_INVALID))
            } else {
                let existed = self.st.filters.insert(f, sub.options);
                if subs::wants_retained(&sub.options, existed) {
                    retained.push(f.to_string());
                }
                pending.waiting.insert(f.to_string(), i);
                native.push((f.to_string(), options));
                None
            };
            pending.reasons.push(r);
        }
        for (topic, options) in native {
            self.send_node(Kind::Subscribe(pc::Subscribe {
                session_id: SID,
                topic,
                last_seq: None,
                options,
            }));
        }
        self.st.subs.push(pending);
        self.marker(MARK_SUBACK, u64::from(s.packet_id.get()));
        // After the marker, so the SUBACK goes out before the retained messages (a refused
        // subscription gets none: the node sends them only for a topic the session has).
        for filter in retained {
            self.send_node(Kind::GetRetained(pc::GetRetained {
                session_id: SID,
                filter,
            }));
        }
    }

    fn on_unsubscribe(&mut self, u: Unsubscribe) {
        for f in &u.filters {
            if f == BROADCAST_TOPIC || f == BROADCAST {
                self.st.broadcast = false;
                self.st.filters.remove(BROADCAST_TOPIC);
                // The node keeps `*` on; this takes it out of a kept session.
                self.send_node(Kind::Unsubscribe(pc::Unsubscribe {
                    session_id: SID,
                    topic: BROADCAST.to_string(),
                }));
            } else if !f.starts_with('$') {
                self.st.filters.remove(f);
                self.send_node(Kind::Unsubscribe(pc::Unsubscribe {
                    session_id: SID,
                    topic: f.clone(),
                }));
            }
        }
        self.st.unsubs.push_back((u.packet_id, u.filters.len()));
        self.marker(MARK_UNSUBACK, u64::from(u.packet_id.get()));
    }

    // --- node → client -------------------------------------------------------------------------

    fn on_frame(&mut self, f: Frame) {
        let Some(kind) = f.kind else { return };
        match kind {
            Kind::Welcome(w) => {
                self.st.connected = true;
                self.st.acked = w.acked_seq;
                self.st.max_sent = w.acked_seq;
                self.st.redelivery_upto = w.redelivery_upto;
                self.note_registration();
                let version = self.st.version.unwrap_or(Version::V311);
                if self.st.filters.restore(&w.subscriptions, version) {
                    self.st.broadcast = true;
                }
                let mut props = Properties::default();
                if self.st.version == Some(Version::V5) {
                    props.maximum_qos = Some(QoS::AtLeastOnce);
                    props.retain_available = Some(true);
                    props.shared_subscription_available = Some(false);
                    props.subscription_identifier_available = Some(false);
                    props.maximum_packet_size = Some(self.limits.max_packet.min(u32::MAX as usize) as u32);
                    props.topic_alias_maximum = Some(TOPIC_ALIAS_MAX);
                    props.assigned_client_identifier = self.st.assigned_id.clone();
                    props.server_keep_alive = self.st.server_keep_alive;
                    // The session's registration: which node, and its epoch (newer logins of
                    // the device get higher ones).
                    props.user_properties = vec![
                        ("herald-node".into(), w.node_id.to_string()),
                        ("herald-epoch".into(), w.epoch.to_string()),
                    ];
                }
                // Session Present: the device had a kept session, whose subscriptions the node
                // restored (WELCOME lists them). The inbox is the user's mailbox whatever it
                // says and resumes at the device's ack cursor.
                self.send_client(&Packet::ConnAck(ConnAck {
                    session_present: w.session_present,
                    reason: ReasonCode::SUCCESS,
                    properties: props,
                }));
            }
            Kind::Error(e) => {
                let code = e.code();
                let reason = error_reason(code);
                self.close_with(reason, &e.message);
            }
            Kind::Push(p) => self.on_push(p),
            Kind::Gap(g) if g.topic.is_empty() && g.to_seq > self.st.max_sent => {
                self.st.max_sent = g.to_seq;
                self.ack_upto();
            }
            Kind::Subscribed(s) => self.on_subscribed(s),
            Kind::Pong(p) => self.on_pong(p.id),
            Kind::UpstreamReply(r) => {
                if let Some((pid, qos)) = self.st.upstream.remove(&r.request_id) {
                    let reason = match (r.error(), self.st.version) {
                        (ErrorCode::Unspecified, _) => ReasonCode::SUCCESS,
                        (_, Some(Version::V5)) => ReasonCode::IMPLEMENTATION_SPECIFIC_ERROR,
                        // 3.1.1's PUBACK carries no outcome; the message was delivered to us.
                        _ => ReasonCode::SUCCESS,
                    };
                    self.answer_publish(pid, qos, reason);
                }
            }
            Kind::TopicPublished(r) => {
                if let Some((pid, qos)) = self.st.publishes.remove(&r.request_id) {
                    let code = r.error();
                    if code != ErrorCode::Unspecified {
                        info!(error = ?code, reason = %r.message, "mqtt: client publish refused");
                    }
                    let reason = match (code, self.st.version) {
                        (ErrorCode::Unspecified, _) => ReasonCode::SUCCESS,
                        // 3.1.1's PUBACK carries no outcome (the refusal is logged).
                        (_, Some(Version::V311) | None) => ReasonCode::SUCCESS,
                        (ErrorCode::PermissionDenied, _) => ReasonCode::NOT_AUTHORIZED,
                        (ErrorCode::BadRequest, _) => ReasonCode::TOPIC_NAME_INVALID,
                        _ => ReasonCode::IMPLEMENTATION_SPECIFIC_ERROR,
                    };
                    self.answer_publish(pid, qos, reason);
                }
            }
            Kind::Kicked(k) => {
                let reason = match k.code() {
                    KickReason::Replaced => ReasonCode::SESSION_TAKEN_OVER,
                    KickReason::NodeDown => ReasonCode::USE_ANOTHER_SERVER,
                    KickReason::TokenExpired => ReasonCode::NOT_AUTHORIZED,
                    _ => ReasonCode::ADMINISTRATIVE_ACTION,
                };
                self.disconnect_with_reference(reason, &k.reason, k.redirect.first());
            }
            Kind::Bye(b) => {
                let reason = if b.redirect.is_empty() {
                    ReasonCode::SERVER_SHUTTING_DOWN
                } else {
                    ReasonCode::USE_ANOTHER_SERVER
                };
                self.disconnect_with_reference(reason, &b.reason, b.redirect.first());
            }
            Kind::SessionClosed(_) => self.eof = true,
            _ => {}
        }
    }

    /// PUBACK (QoS 1) or PUBREC (3.1.1 QoS 2) for a client's PUBLISH the node answered.
    fn answer_publish(&mut self, packet_id: NonZeroU16, qos: QoS, reason: ReasonCode) {
        let ack = Ack {
            packet_id,
            reason,
            properties: Properties::default(),
        };
        if qos == QoS::ExactlyOnce {
            if let Some(answered) = self.st.qos2.get_mut(&packet_id.get()) {
                *answered = true;
            }
            self.send_client(&Packet::PubRec(ack));
        } else {
            self.send_client(&Packet::PubAck(ack));
        }
    }

    fn disconnect_with_reference(&mut self, reason: ReasonCode, why: &str, to: Option<&String>) {
        if self.st.version == Some(Version::V5) && self.st.connected {
            self.send_client(&Packet::Disconnect(Disconnect {
                reason,
                properties: Properties {
                    reason_string: Some(why.to_string()),
                    server_reference: to.cloned(),
                    ..Properties::default()
                },
            }));
        }
        self.eof = true;
    }

    /// For a delayed will: the log time of the device's registration this session is, so a
    /// later login of the client id can be told from it when the delay is over.
    fn note_registration(&mut self) {
        let (Some(room), Some(w)) = (&self.room, &mut self.st.will) else {
            return;
        };
        if will_delay_s(w.delay_s, w.session_expiry_s) == 0 {
            return;
        }
        if let Ok(devices) = room
            .user_state(&self.st.app, &w.user)
            .devices(&self.st.app, &w.user)
        {
            if let Some((_, d)) = devices.into_iter().find(|(d, _)| *d == w.device) {
                w.registered_ms = d.last_seen_ms;
            }
        }
    }

    /// Cluster time (ms), read once per batch of frames: log time as the members' clocks tell
    /// it, which is what a message's expiry is judged by.
    fn now_ms(&mut self) -> u64 {
        if let Some(t) = self.st.now_ms {
            return t;
        }
        let t = match &self.room {
            Some(room) => room.groups.meta().cluster_now_ms(),
            None => herald_raft::raft_node::now_ms(),
        };
        self.st.now_ms = Some(t);
        t
    }

    fn on_push(&mut self, p: pc::Push) {
        let qos1 = p.qos() == pc::Qos::AtLeastOnce;
        let retain = p.retain();
        let mut properties = Properties::default();
        if self.st.version == Some(Version::V5) {
            if p.expires_at_ms > 0 {
                properties.message_expiry_interval = Some(expiry_interval(p.expires_at_ms, self.now_ms()));
            }
            // What Herald knows of the message, for a client that dedupes by id.
            let (name, seq) = if p.topic.is_empty() {
                ("herald-seq", p.seq)
            } else {
                ("herald-topic-seq", p.topic_seq)
            };
            properties.user_properties = vec![
                ("herald-msg-id".into(), p.msg_id.clone()),
                (name.into(), seq.to_string()),
            ];
        }
        let mut publish = Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: String::new(),
            packet_id: None,
            properties,
            payload: p.payload,
        };
        if p.topic.is_empty() {
            publish.topic = INBOX.to_string();
            // Seq 0 is an online-only message (not in the mailbox): nothing to ack.
            if qos1 && p.seq > 0 {
                publish.qos = QoS::AtLeastOnce;
                if p.seq <= self.st.max_sent {
                    // Sent before on this connection (or acked, or passed over by a gap): sent
                    // again only while the client has not PUBACKed it, under its packet id, DUP.
                    let Some((&pid, _)) = self.st.inflight.iter().find(|(_, s)| **s == p.seq) else {
                        return;
                    };
                    publish.packet_id = NonZeroU16::new(pid);
                    publish.dup = true;
                } else {
                    self.st.max_sent = p.seq;
                    let Some(pid) = self.next_packet_id() else {
                        return self.close_with(
                            ReasonCode::RECEIVE_MAXIMUM_EXCEEDED,
                            "65,535 messages in flight without a PUBACK",
                        );
                    };
                    self.st.inflight.insert(pid.get(), p.seq);
                    self.st.unacked.insert(p.seq);
                    publish.packet_id = Some(pid);
                    // An earlier connection of the device may have sent it (docs/MQTT.md, DUP).
                    publish.dup = p.seq <= self.st.redelivery_upto;
                }
            } else {
                if p.seq > self.st.max_sent {
                    self.st.max_sent = p.seq;
                }
                // QoS 0: delivered once handed over, nothing to wait for.
                self.ack_upto();
            }
        } else if p.topic == BROADCAST {
            if !self.st.broadcast {
                return;
            }
            publish.topic = BROADCAST_TOPIC.to_string();
        } else {
            // The topic's retained message (asked for by a SUBSCRIBE) has RETAIN 1; a live
            // message its publisher retained keeps RETAIN 1 only for Retain As Published (5.0).
            publish.retain = match retain {
                pc::Retain::Stored => true,
                pc::Retain::Set => {
                    self.st.version == Some(Version::V5) && self.st.filters.retain_as_published(&p.topic)
                }
                pc::Retain::None => false,
            };
            publish.topic = p.topic;
        }
        let aliased = self.alias_outbound(&mut publish);
        let packet_id = publish.packet_id;
        let before = self.wbuf.len();
        let sent = self.send_client(&Packet::Publish(publish));
        let size = self.wbuf.len() - before;
        let too_large = sent && self.st.out_max_packet.is_some_and(|max| size > max as usize);
        if too_large {
            // Larger than the client said it accepts: discarded without sending, and handled as
            // if sent [MQTT-3.1.2-25]; a QoS 1 inbox message then counts as PUBACKed.
            self.wbuf.truncate(before);
            debug!(
                size,
                max = self.st.out_max_packet,
                "mqtt: a PUBLISH over the client's Maximum Packet Size was discarded"
            );
            if let Some(seq) = packet_id.and_then(|pid| self.st.inflight.remove(&pid.get())) {
                self.st.unacked.remove(&seq);
                self.ack_upto();
            }
        }
        if !sent || too_large {
            if let Some(topic) = aliased {
                self.unalias(&topic);
            }
        }
    }

    fn next_packet_id(&mut self) -> Option<NonZeroU16> {
        for _ in 0..=u16::MAX {
            self.st.next_packet_id = self.st.next_packet_id.wrapping_add(1);
            if let Some(id) = NonZeroU16::new(self.st.next_packet_id) {
                if !self.st.inflight.contains_key(&id.get()) {
                    return Some(id);
                }
            }
        }
        None
    }

    fn on_subscribed(&mut self, s: pc::Subscribed) {
        let v5 = self.st.version == Some(Version::V5);
        let Some(sub) = self.st.subs.iter_mut().find(|p| p.waiting.contains_key(&s.topic)) else {
            return;
        };
        let i = sub.waiting.remove(&s.topic).unwrap_or_default();
        let reason = match (s.error(), v5) {
            (ErrorCode::Unspecified, _) => ReasonCode::GRANTED_QOS_0,
            (_, false) => ReasonCode::UNSPECIFIED_ERROR,
            (ErrorCode::PermissionDenied, true) => ReasonCode::NOT_AUTHORIZED,
            (ErrorCode::BadRequest, true) => ReasonCode::TOPIC_FILTER_INVALID,
            (ErrorCode::TooManySessions | ErrorCode::RateLimited, true) => ReasonCode::QUOTA_EXCEEDED,
            (_, true) => ReasonCode::UNSPECIFIED_ERROR,
        };
        if let Some(slot) = sub.reasons.get_mut(i) {
            *slot = Some(reason);
        }
        if s.error() != ErrorCode::Unspecified {
            // Refused: not one of the session's subscriptions (for Retain Handling 1 and Retain
            // As Published), and a refused broadcast subscription delivers nothing.
            if s.topic == BROADCAST {
                self.st.broadcast = false;
                self.st.filters.remove(BROADCAST_TOPIC);
            } else {
                self.st.filters.remove(&s.topic);
            }
        }
        self.flush_subacks();
    }

    fn on_pong(&mut self, id: u64) {
        match id >> 56 {
            MARK_PING => {
                self.send_client(&Packet::PingResp);
            }
            MARK_SUBACK => {
                let pid = ((id >> 32) & 0xffff) as u16;
                if let Some(s) = self.st.subs.iter_mut().find(|s| s.packet_id.get() == pid) {
                    s.marked = true;
                }
                self.flush_subacks();
            }
            MARK_UNSUBACK => {
                // The node answers in order, so the oldest UNSUBSCRIBE is the one answered.
                let Some((pid, n)) = self.st.unsubs.pop_front() else {
                    return;
                };
                let reasons = match self.st.version {
                    Some(Version::V5) => vec![ReasonCode::SUCCESS; n],
                    _ => Vec::new(),
                };
                self.send_client(&Packet::UnsubAck(UnsubAck {
                    packet_id: pid,
                    properties: Properties::default(),
                    reasons,
                }));
            }
            _ => {}
        }
    }

    /// Sends the SUBACKs whose every answer is in, in the order the SUBSCRIBEs came.
    fn flush_subacks(&mut self) {
        while let Some(s) = self.st.subs.first() {
            if !s.marked || !s.waiting.is_empty() {
                break;
            }
            let s = self.st.subs.remove(0);
            let reasons = s
                .reasons
                .into_iter()
                .map(|r| r.unwrap_or(ReasonCode::UNSPECIFIED_ERROR))
                .collect();
            self.send_client(&Packet::SubAck(SubAck {
                packet_id: s.packet_id,
                properties: Properties::default(),
                reasons,
            }));
        }
    }
}

impl<S> Drop for MqttStream<S> {
    /// The will goes out when the connection ends any way but a normal DISCONNECT (an I/O error,
    /// a keep alive timeout, a protocol error, a kick or a drain), once the session was accepted.
    fn drop(&mut self) {
        let (Some(room), Some(will), true) = (self.room.take(), self.st.will.take(), self.st.connected)
        else {
            return;
        };
        let app = std::mem::take(&mut self.st.app);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(publish_will(room, app, will));
        }
    }
}

/// Publishes a will once its delay is over, unless the client id logged in again meanwhile
/// (anywhere in the cluster) [MQTT-3.1.3-9]. A delayed will waits in this node's memory: it is
/// lost if the node stops first.
async fn publish_will(room: std::sync::Arc<super::Room>, app: String, will: Box<WillMsg>) {
    let delay = will_delay_s(will.delay_s, will.session_expiry_s);
    if delay == 0 {
        return commit_will(&room, app, *will).await;
    }
    let waiting = &room.stats.mqtt_delayed_wills;
    if waiting.fetch_add(1, Ordering::AcqRel) >= MAX_DELAYED_WILLS {
        waiting.fetch_sub(1, Ordering::AcqRel);
        info!(app = %app, topic = %will.topic, "mqtt: too many delayed wills on this node; published now");
        return commit_will(&room, app, *will).await;
    }
    // While it waits the will does not keep the room (and its stores) alive: a node that stops
    // meanwhile loses it.
    let weak = std::sync::Arc::downgrade(&room);
    drop(room);
    tokio::time::sleep(std::time::Duration::from_secs(u64::from(delay))).await;
    let Some(room) = weak.upgrade() else {
        return debug!(app = %app, "mqtt: the node stopped; delayed will lost");
    };
    room.stats.mqtt_delayed_wills.fetch_sub(1, Ordering::AcqRel);
    // A login the leader applied is seen here too.
    let group = room.user_group(&app, &will.user);
    room.barrier.catch_up(group).await;
    let live = group.reader().session(&app, &will.user, &will.device);
    let devices = group.reader().devices(&app, &will.user);
    let (Ok(live), Ok(devices)) = (live, devices) else {
        return info!(app = %app, "mqtt: cannot read the registry; delayed will not published");
    };
    let last_login = devices
        .into_iter()
        .find(|(d, _)| *d == will.device)
        .map_or(0, |(_, d)| d.last_seen_ms);
    if live.is_some() || last_login > will.registered_ms {
        return debug!(app = %app, device = %will.device, "mqtt: the client came back; delayed will dropped");
    }
    commit_will(&room, app, *will).await
}

/// Commits a will like a client publish: only to a topic the app lets its clients publish to.
/// A will with the retain flag becomes the topic's retained message (until its Message Expiry
/// Interval, if it has one).
async fn commit_will(room: &super::Room, app: String, will: WillMsg) {
    let WillMsg {
        topic,
        payload,
        retain,
        expiry_s,
        ..
    } = will;
    let Ok(Some(cfg)) = room.meta().app(&app) else {
        return;
    };
    let allowed = herald_mqtt::topic::validate_name(&topic).is_ok()
        && !topic.starts_with('$')
        && topic != BROADCAST
        && cfg
            .client_publish
            .iter()
            .any(|f| herald_mqtt::topic::matches(f, &topic));
    if !allowed || payload.len() > cfg.limits.max_payload as usize {
        info!(app = %app, topic = %topic, "mqtt: will not published (the app does not let clients publish there, or too large)");
        return;
    }
    let raft = room.groups.of_topic(&app, &topic).clone();
    let publish = herald_raft::Publish {
        app,
        topic,
        msg_id: format!("w{}-{:016x}", room.groups.id(), rand::random::<u64>()),
        payload,
        idempotency_key: None,
    };
    let op = if retain {
        herald_raft::Op::PublishRetained {
            publish,
            ttl_ms: u64::from(expiry_s) * 1000,
        }
    } else {
        herald_raft::Op::Publish(publish)
    };
    if let Err(e) = raft.write_one(op).await {
        info!(error = %e, "mqtt: will not committed");
    }
}

/// A mailbox message's Message Expiry Interval (seconds): what is left of its TTL at `now_ms`,
/// rounded up. At least 1: a message the state machine still holds is delivered, even when this
/// node's estimate of log time is already past its expiry (the leader's expiry has not removed it
/// yet), and 0 would not say "expires now" to every client.
fn expiry_interval(expires_at_ms: u64, now_ms: u64) -> u32 {
    let left = expires_at_ms.saturating_sub(now_ms).div_ceil(1000);
    left.clamp(1, u64::from(u32::MAX)) as u32
}

/// The CONNACK / DISCONNECT reason for a native error.
fn error_reason(code: ErrorCode) -> ReasonCode {
    match code {
        ErrorCode::BadToken | ErrorCode::TokenExpired | ErrorCode::UnknownApp => {
            ReasonCode::BAD_USER_NAME_OR_PASSWORD
        }
        ErrorCode::PermissionDenied => ReasonCode::NOT_AUTHORIZED,
        ErrorCode::SessionExists => ReasonCode::CLIENT_IDENTIFIER_NOT_VALID,
        ErrorCode::TooManySessions => ReasonCode::QUOTA_EXCEEDED,
        ErrorCode::RateLimited => ReasonCode::CONNECTION_RATE_EXCEEDED,
        ErrorCode::ServerBusy => ReasonCode::SERVER_BUSY,
        ErrorCode::NotReady => ReasonCode::SERVER_UNAVAILABLE,
        ErrorCode::AuthTimeout => ReasonCode::KEEP_ALIVE_TIMEOUT,
        ErrorCode::FrameTooLarge => ReasonCode::PACKET_TOO_LARGE,
        ErrorCode::SlowConsumer => ReasonCode::RECEIVE_MAXIMUM_EXCEEDED,
        _ => ReasonCode::UNSPECIFIED_ERROR,
    }
}

/// 3.1.1's CONNACK has six return codes; every refusal maps to one of them.
fn v311_connack_code(r: ReasonCode) -> ReasonCode {
    match r {
        ReasonCode::SUCCESS
        | ReasonCode::UNSUPPORTED_PROTOCOL_VERSION
        | ReasonCode::CLIENT_IDENTIFIER_NOT_VALID
        | ReasonCode::SERVER_UNAVAILABLE
        | ReasonCode::BAD_USER_NAME_OR_PASSWORD
        | ReasonCode::NOT_AUTHORIZED => r,
        ReasonCode::SERVER_BUSY | ReasonCode::QUOTA_EXCEEDED | ReasonCode::CONNECTION_RATE_EXCEEDED => {
            ReasonCode::SERVER_UNAVAILABLE
        }
        _ => ReasonCode::NOT_AUTHORIZED,
    }
}

/// Gives an emptied buffer's memory back: an idle connection holds no buffer (as the native
/// connection task does; measured in BENCHMARKS.md, idle memory per MQTT connection).
fn release(b: &mut BytesMut) {
    if b.is_empty() && b.capacity() > 0 {
        *b = BytesMut::new();
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> MqttStream<S> {
    /// Writes `wbuf` to the socket.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.wbuf.is_empty() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.wbuf))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.wbuf.advance(n);
        }
        release(&mut self.wbuf);
        if self.st.subs.is_empty() {
            self.st.subs = Vec::new();
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for MqttStream<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.native_in.is_empty() {
                let n = this.native_in.len().min(buf.remaining());
                buf.put_slice(&this.native_in[..n]);
                this.native_in.advance(n);
                release(&mut this.native_in);
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                // What the translator wrote itself (a refusal) goes out before the EOF.
                let _ = ready!(this.poll_drain(cx));
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; 8 * 1024];
            let mut rb = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
            if rb.filled().is_empty() {
                this.eof = true;
                continue;
            }
            this.rbuf.extend_from_slice(rb.filled());
            while !this.eof {
                match herald_mqtt::decode(&mut this.rbuf, this.st.version, this.limits.max_packet) {
                    Ok(Some(p)) => this.on_packet(p),
                    Ok(None) => break,
                    Err(e) => this.decode_error(e),
                }
            }
            release(&mut this.rbuf);
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for MqttStream<S> {
    fn poll_write(self: Pin<&mut Self>, _cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.st.now_ms = None;
        this.native_out.extend_from_slice(data);
        loop {
            match herald_proto::frame::decode(&mut this.native_out, usize::MAX) {
                Ok(Some(f)) => this.on_frame(f),
                Ok(None) => break,
                Err(e) => return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e))),
            }
        }
        release(&mut this.native_out);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_drain(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use proptest::prelude::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    fn limits() -> Limits {
        Limits {
            max_packet: 64 * 1024,
            max_frame: 64 * 1024,
            heartbeat_min_ms: 1_000,
            heartbeat_max_ms: 600_000,
        }
    }

    fn connect(version: Version, password: Option<&str>) -> Vec<u8> {
        let mut out = BytesMut::new();
        let c = Connect {
            version,
            clean_start: false,
            keep_alive: 30,
            properties: Properties::default(),
            client_id: "phone".into(),
            will: None,
            user_name: Some("demo".into()),
            password: password.map(|p| Bytes::copy_from_slice(p.as_bytes())),
        };
        herald_mqtt::encode(&Packet::Connect(c), version, &mut out).unwrap();
        out.to_vec()
    }

    fn token() -> String {
        crate::token::mint(
            &crate::token::Claims {
                app: "demo".into(),
                sub: "alice".into(),
                dev: None,
                iat: 1,
                exp: u64::MAX / 2,
            },
            "secret",
        )
    }

    /// Reads what the translator has for the connection task now (without waiting).
    async fn native(s: &mut MqttStream<DuplexStream>) -> Vec<Frame> {
        let mut got = BytesMut::new();
        let mut buf = [0u8; 4096];
        while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(50), s.read(&mut buf)).await {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        let mut frames = Vec::new();
        while let Some(f) = herald_proto::frame::decode(&mut got, usize::MAX).unwrap() {
            frames.push(f);
        }
        frames
    }

    use std::time::Duration;

    #[tokio::test]
    async fn connect_becomes_hello_and_welcome_becomes_connack() {
        for version in [Version::V311, Version::V5] {
            let (mut client, server) = tokio::io::duplex(1 << 16);
            let mut s = MqttStream::new(server, limits());
            client.write_all(&connect(version, Some(&token()))).await.unwrap();
            let frames = native(&mut s).await;
            let Some(Kind::Hello(h)) = frames.first().and_then(|f| f.kind.clone()) else {
                panic!("{version:?}: no HELLO: {frames:?}");
            };
            let o = h.session.unwrap();
            assert_eq!(
                (o.app.as_str(), o.user.as_str(), o.device.as_str()),
                ("demo", "alice", "phone")
            );
            // The node's 2.5 heartbeats = MQTT's 1.5 keep alives.
            assert_eq!(h.heartbeat_ms, 18_000);
            let welcome = Frame {
                kind: Some(Kind::Welcome(pc::Welcome {
                    session_id: 1,
                    ..Default::default()
                })),
            };
            s.write_all(&herald_proto::frame::encode_to_bytes(&welcome))
                .await
                .unwrap();
            s.flush().await.unwrap();
            let mut buf = BytesMut::new();
            client.read_buf(&mut buf).await.unwrap();
            match herald_mqtt::decode(&mut buf, Some(version), 1 << 16).unwrap() {
                Some(Packet::ConnAck(a)) => assert_eq!(a.reason, ReasonCode::SUCCESS),
                other => panic!("{version:?}: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn a_password_that_is_not_a_token_is_refused_without_asking_the_node() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let mut s = MqttStream::new(server, limits());
        client
            .write_all(&connect(Version::V311, Some("nope")))
            .await
            .unwrap();
        assert!(native(&mut s).await.is_empty());
        let mut buf = BytesMut::new();
        client.read_buf(&mut buf).await.unwrap();
        match herald_mqtt::decode(&mut buf, Some(Version::V311), 1 << 16).unwrap() {
            Some(Packet::ConnAck(a)) => assert_eq!(a.reason, ReasonCode::BAD_USER_NAME_OR_PASSWORD),
            other => panic!("{other:?}"),
        }
    }

    /// A 5.0 (or 3.1.1) translator past CONNECT (with `props`) and WELCOME (with `acked`), its
    /// CONNACK read; the HELLO went to the node.
    async fn connected(
        version: Version,
        props: Properties,
        welcome: pc::Welcome,
    ) -> (DuplexStream, MqttStream<DuplexStream>, ConnAck) {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let mut s = MqttStream::new(server, limits());
        let mut out = BytesMut::new();
        let c = Connect {
            version,
            clean_start: false,
            keep_alive: 30,
            properties: props,
            client_id: "phone".into(),
            will: None,
            user_name: Some("demo".into()),
            password: Some(Bytes::from(token())),
        };
        herald_mqtt::encode(&Packet::Connect(c), version, &mut out).unwrap();
        client.write_all(&out).await.unwrap();
        let _ = native(&mut s).await;
        node_says(
            &mut s,
            Kind::Welcome(pc::Welcome {
                session_id: 1,
                ..welcome
            }),
        )
        .await;
        let Some(Packet::ConnAck(ack)) = client_reads(&mut client, version).await.pop() else {
            panic!("no CONNACK");
        };
        (client, s, ack)
    }

    /// Hands the translator frames as the connection task would write them.
    async fn node_says(s: &mut MqttStream<DuplexStream>, kind: Kind) {
        s.write_all(&herald_proto::frame::encode_to_bytes(&Frame { kind: Some(kind) }))
            .await
            .unwrap();
        s.flush().await.unwrap();
    }

    /// The MQTT packets the client has received now (without waiting for more).
    async fn client_reads(client: &mut DuplexStream, version: Version) -> Vec<Packet> {
        let mut got = BytesMut::new();
        let mut buf = [0u8; 4096];
        while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(50), client.read(&mut buf)).await {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        let mut packets = Vec::new();
        while let Some(p) = herald_mqtt::decode(&mut got, Some(version), 1 << 20).unwrap() {
            packets.push(p);
        }
        packets
    }

    async fn client_sends(client: &mut DuplexStream, p: Packet) {
        let mut out = BytesMut::new();
        herald_mqtt::encode(&p, Version::V5, &mut out).unwrap();
        client.write_all(&out).await.unwrap();
    }

    fn publish(topic: &str, alias: Option<u16>, payload: &'static str) -> Packet {
        Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: topic.into(),
            packet_id: None,
            properties: Properties {
                topic_alias: alias,
                ..Properties::default()
            },
            payload: Bytes::from_static(payload.as_bytes()),
        })
    }

    fn topic_push(topic: &str, seq: u64) -> Kind {
        Kind::Push(pc::Push {
            session_id: 1,
            topic: topic.into(),
            topic_seq: seq,
            payload: Bytes::from_static(b"x"),
            ..Default::default()
        })
    }

    /// The topics of the client PUBLISHes the node was handed (PUBLISH_TOPIC).
    fn published_topics(frames: &[Frame]) -> Vec<String> {
        frames
            .iter()
            .filter_map(|f| match &f.kind {
                Some(Kind::PublishTopic(p)) => Some(p.topic.clone()),
                _ => None,
            })
            .collect()
    }

    fn subscribe(packet_id: u16, subs: &[(&str, herald_mqtt::RetainHandling, bool)]) -> Packet {
        Packet::Subscribe(Subscribe {
            packet_id: NonZeroU16::new(packet_id).unwrap(),
            properties: Properties::default(),
            subscriptions: subs
                .iter()
                .map(|(filter, rh, rap)| herald_mqtt::Subscription {
                    filter: filter.to_string(),
                    options: herald_mqtt::SubscriptionOptions {
                        qos: QoS::AtLeastOnce,
                        no_local: false,
                        retain_as_published: *rap,
                        retain_handling: *rh,
                    },
                })
                .collect(),
        })
    }

    #[tokio::test]
    async fn a_subscribe_asks_for_retained_messages_after_its_marker_by_retain_handling() {
        use herald_mqtt::RetainHandling::*;
        let (mut client, mut s, ack) =
            connected(Version::V5, Properties::default(), pc::Welcome::default()).await;
        assert_eq!(ack.properties.retain_available, Some(true));
        assert!(!ack.session_present);
        client_sends(
            &mut client,
            subscribe(
                1,
                &[
                    ("a/+", SendAtSubscribe, false),
                    ("b", SendAtNewSubscribe, true),
                    ("c", DoNotSend, false),
                    (BROADCAST_TOPIC, SendAtSubscribe, false),
                ],
            ),
        )
        .await;
        // Retain Handling 1 on a filter the session has: not asked for.
        client_sends(&mut client, subscribe(2, &[("b", SendAtNewSubscribe, false)])).await;
        let kinds: Vec<String> = native(&mut s)
            .await
            .into_iter()
            .filter_map(|f| match f.kind? {
                Kind::Subscribe(x) => Some(format!("sub {} {}", x.topic, x.options)),
                Kind::Ping(_) => Some("marker".into()),
                Kind::GetRetained(g) => Some(format!("retained {}", g.filter)),
                _ => None,
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "sub a/+ 1",
                "sub b 25",
                "sub c 33",
                "sub * 1",
                "marker",
                "retained a/+",
                "retained b",
                "sub b 17",
                "marker",
            ]
        );
    }

    #[tokio::test]
    async fn a_refused_broadcast_subscription_gets_0x80_and_no_broadcasts() {
        use herald_mqtt::RetainHandling::*;
        let (mut client, mut s, _) =
            connected(Version::V5, Properties::default(), pc::Welcome::default()).await;
        client_sends(
            &mut client,
            subscribe(1, &[(BROADCAST_TOPIC, SendAtSubscribe, false)]),
        )
        .await;
        let marker = native(&mut s)
            .await
            .into_iter()
            .find_map(|f| match f.kind? {
                Kind::Ping(p) => Some(p.id),
                _ => None,
            })
            .expect("a marker");
        // A kept session whose subscription could not be committed.
        node_says(
            &mut s,
            Kind::Subscribed(pc::Subscribed {
                session_id: 1,
                topic: BROADCAST.into(),
                error: ErrorCode::NotReady as i32,
                ..Default::default()
            }),
        )
        .await;
        node_says(&mut s, Kind::Pong(pc::Pong { id: marker })).await;
        node_says(&mut s, topic_push(BROADCAST, 1)).await;
        let got = client_reads(&mut client, Version::V5).await;
        assert!(
            matches!(got.as_slice(), [Packet::SubAck(a)] if a.reasons == [ReasonCode::UNSPECIFIED_ERROR]),
            "{got:?}"
        );
    }

    #[tokio::test]
    async fn retained_pushes_carry_retain_1_and_live_ones_only_for_retain_as_published() {
        use herald_mqtt::RetainHandling::*;
        for version in [Version::V5, Version::V311] {
            let (mut client, mut s, _) =
                connected(version, Properties::default(), pc::Welcome::default()).await;
            let mut out = BytesMut::new();
            let Packet::Subscribe(sub) = subscribe(
                1,
                &[
                    ("rap/+", SendAtSubscribe, true),
                    ("plain", SendAtSubscribe, false),
                ],
            ) else {
                unreachable!()
            };
            let sub = if version == Version::V311 {
                // 3.1.1 has no 5.0 options.
                Subscribe {
                    subscriptions: sub
                        .subscriptions
                        .into_iter()
                        .map(|x| herald_mqtt::Subscription {
                            options: herald_mqtt::SubscriptionOptions::new(QoS::AtMostOnce),
                            ..x
                        })
                        .collect(),
                    ..sub
                }
            } else {
                sub
            };
            herald_mqtt::encode(&Packet::Subscribe(sub), version, &mut out).unwrap();
            client.write_all(&out).await.unwrap();
            let _ = native(&mut s).await;
            let _ = client_reads(&mut client, version).await;
            let push = |topic: &str, retain: pc::Retain| {
                Kind::Push(pc::Push {
                    session_id: 1,
                    topic: topic.into(),
                    topic_seq: 1,
                    payload: Bytes::from_static(b"x"),
                    retain: retain as i32,
                    ..Default::default()
                })
            };
            for (topic, mark) in [
                ("plain", pc::Retain::Stored),
                ("plain", pc::Retain::Set),
                ("rap/x", pc::Retain::Set),
                ("rap/x", pc::Retain::None),
            ] {
                node_says(&mut s, push(topic, mark)).await;
            }
            let flags: Vec<bool> = client_reads(&mut client, version)
                .await
                .into_iter()
                .filter_map(|p| match p {
                    Packet::Publish(p) => Some(p.retain),
                    _ => None,
                })
                .collect();
            let rap = version == Version::V5;
            assert_eq!(flags, [true, false, rap, false], "{version:?}");
        }
    }

    #[tokio::test]
    async fn a_kept_session_is_asked_for_and_restored_from_welcome() {
        for (version, expiry, want) in [
            (Version::V5, Some(60), 60),
            (Version::V5, None, 0),
            (Version::V311, None, herald_raft::KEPT_FOREVER),
        ] {
            let (mut client, server) = tokio::io::duplex(1 << 16);
            let mut s = MqttStream::new(server, limits());
            let mut out = BytesMut::new();
            let c = Connect {
                version,
                clean_start: false,
                keep_alive: 30,
                properties: Properties {
                    session_expiry_interval: expiry,
                    ..Properties::default()
                },
                client_id: "phone".into(),
                will: None,
                user_name: Some("demo".into()),
                password: Some(Bytes::from(token())),
            };
            herald_mqtt::encode(&Packet::Connect(c), version, &mut out).unwrap();
            client.write_all(&out).await.unwrap();
            let Some(Kind::Hello(h)) = native(&mut s).await.pop().and_then(|f| f.kind) else {
                panic!("no HELLO");
            };
            assert_eq!(
                h.session.unwrap().keep,
                Some(pc::Keep {
                    clean: false,
                    expiry_s: want
                }),
                "{version:?}"
            );
            let rap_rh2 = herald_mqtt::SubscriptionOptions {
                qos: QoS::AtMostOnce,
                no_local: false,
                retain_as_published: true,
                retain_handling: herald_mqtt::RetainHandling::DoNotSend,
            };
            let welcome = pc::Welcome {
                session_id: 1,
                session_present: true,
                subscriptions: vec![
                    pc::KeptSubscription {
                        topic: "news/+".into(),
                        options: subs::encode_options(&rap_rh2),
                    },
                    pc::KeptSubscription {
                        topic: BROADCAST.into(),
                        options: 0,
                    },
                ],
                ..Default::default()
            };
            node_says(&mut s, Kind::Welcome(welcome)).await;
            let Some(Packet::ConnAck(ack)) = client_reads(&mut client, version).await.pop() else {
                panic!("no CONNACK");
            };
            assert!(ack.session_present, "{version:?}");
            // The restored broadcast subscription delivers; the restored filter keeps its options.
            node_says(&mut s, topic_push(BROADCAST, 1)).await;
            let got = client_reads(&mut client, version).await;
            assert!(
                matches!(got.as_slice(), [Packet::Publish(p)] if p.topic == BROADCAST_TOPIC),
                "{got:?}"
            );
            // (3.1.1 reads the options byte without its 5.0 bits.)
            assert_eq!(
                s.st.filters.retain_as_published("news/x"),
                version == Version::V5,
                "{version:?}"
            );
            // A DISCONNECT's Session Expiry Interval is passed on for a kept session only.
            let mut out = BytesMut::new();
            let d = Disconnect {
                reason: ReasonCode::SUCCESS,
                properties: Properties {
                    session_expiry_interval: (version == Version::V5).then_some(5),
                    ..Properties::default()
                },
            };
            herald_mqtt::encode(&Packet::Disconnect(d), version, &mut out).unwrap();
            client.write_all(&out).await.unwrap();
            let close = native(&mut s).await.into_iter().find_map(|f| match f.kind {
                Some(Kind::CloseSession(c)) => Some(c.expiry_s),
                _ => None,
            });
            let passed_on = (version == Version::V5 && want > 0).then_some(5);
            assert_eq!(close, Some(passed_on), "{version:?}");
        }
    }

    #[tokio::test]
    async fn a_client_sets_and_uses_topic_aliases_up_to_the_connacks_maximum() {
        let (mut client, mut s, ack) =
            connected(Version::V5, Properties::default(), pc::Welcome::default()).await;
        assert_eq!(ack.properties.topic_alias_maximum, Some(TOPIC_ALIAS_MAX));
        client_sends(&mut client, publish("chat/a", Some(3), "one")).await;
        client_sends(&mut client, publish("", Some(3), "two")).await;
        client_sends(&mut client, publish("chat/b", Some(TOPIC_ALIAS_MAX), "three")).await;
        // Re-mapping an alias is allowed.
        client_sends(&mut client, publish("chat/c", Some(3), "four")).await;
        client_sends(&mut client, publish("", Some(3), "five")).await;
        client_sends(&mut client, publish("", Some(TOPIC_ALIAS_MAX), "six")).await;
        let frames = native(&mut s).await;
        assert_eq!(
            published_topics(&frames),
            ["chat/a", "chat/a", "chat/b", "chat/c", "chat/c", "chat/b"]
        );
    }

    #[tokio::test]
    async fn a_bad_topic_alias_closes_the_connection_with_its_reason_code() {
        for (p, reason) in [
            (publish("", Some(4), "never set"), ReasonCode::PROTOCOL_ERROR),
            (
                publish("chat/a", Some(TOPIC_ALIAS_MAX + 1), "too high"),
                ReasonCode::TOPIC_ALIAS_INVALID,
            ),
            (
                publish("", Some(TOPIC_ALIAS_MAX + 1), "too high"),
                ReasonCode::TOPIC_ALIAS_INVALID,
            ),
            (
                publish(&"x".repeat(MAX_NAME + 1), Some(1), "long"),
                ReasonCode::TOPIC_NAME_INVALID,
            ),
        ] {
            let (mut client, mut s, _) =
                connected(Version::V5, Properties::default(), pc::Welcome::default()).await;
            client_sends(&mut client, p).await;
            let frames = native(&mut s).await;
            assert!(published_topics(&frames).is_empty(), "{frames:?}");
            assert!(s.eof, "the connection is ended");
            match client_reads(&mut client, Version::V5).await.pop() {
                Some(Packet::Disconnect(d)) => assert_eq!(d.reason, reason),
                other => panic!("expected DISCONNECT {reason:?}, got {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn the_node_uses_aliases_only_when_the_client_allows_them() {
        let allow = |n| Properties {
            topic_alias_maximum: n,
            ..Properties::default()
        };
        for (version, props, want) in [
            (
                Version::V5,
                allow(Some(2)),
                vec![
                    ("t1", Some(1)),
                    ("", Some(1)),
                    ("t2", Some(2)),
                    ("t3", None),
                    ("", Some(2)),
                ],
            ),
            (
                Version::V5,
                allow(None),
                vec![
                    ("t1", None),
                    ("t1", None),
                    ("t2", None),
                    ("t3", None),
                    ("t2", None),
                ],
            ),
            (
                Version::V311,
                Properties::default(),
                vec![
                    ("t1", None),
                    ("t1", None),
                    ("t2", None),
                    ("t3", None),
                    ("t2", None),
                ],
            ),
        ] {
            let (mut client, mut s, _) = connected(version, props, pc::Welcome::default()).await;
            for (i, t) in ["t1", "t1", "t2", "t3", "t2"].into_iter().enumerate() {
                node_says(&mut s, topic_push(t, i as u64 + 1)).await;
            }
            let got: Vec<(String, Option<u16>)> = client_reads(&mut client, version)
                .await
                .into_iter()
                .filter_map(|p| match p {
                    Packet::Publish(p) => Some((p.topic, p.properties.topic_alias)),
                    _ => None,
                })
                .collect();
            let want: Vec<(String, Option<u16>)> =
                want.into_iter().map(|(t, a)| (t.to_string(), a)).collect();
            assert_eq!(got, want, "{version:?}");
        }
    }

    fn inbox_push(seq: u64) -> Kind {
        Kind::Push(pc::Push {
            session_id: 1,
            seq,
            qos: pc::Qos::AtLeastOnce as i32,
            payload: Bytes::from_static(b"x"),
            ..Default::default()
        })
    }

    /// (packet id, DUP) of the QoS 1 PUBLISHes the client got.
    async fn inbox_publishes(client: &mut DuplexStream, version: Version) -> Vec<(u16, bool)> {
        client_reads(client, version)
            .await
            .into_iter()
            .filter_map(|p| match p {
                Packet::Publish(p) if p.qos == QoS::AtLeastOnce => Some((p.packet_id.unwrap().get(), p.dup)),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn dup_is_set_up_to_the_welcomes_redelivery_bound_and_on_a_resend() {
        for version in [Version::V5, Version::V311] {
            let welcome = pc::Welcome {
                acked_seq: 2,
                redelivery_upto: 4,
                ..Default::default()
            };
            let (mut client, mut s, _) = connected(version, Properties::default(), welcome).await;
            for seq in [3, 4, 5] {
                node_says(&mut s, inbox_push(seq)).await;
            }
            assert_eq!(
                inbox_publishes(&mut client, version).await,
                [(1, true), (2, true), (3, false)],
                "{version:?}"
            );
            // Sent again on this connection before its PUBACK: same packet id, DUP.
            node_says(&mut s, inbox_push(5)).await;
            assert_eq!(
                inbox_publishes(&mut client, version).await,
                [(3, true)],
                "{version:?}"
            );
            // PUBACKed, or at or below the ack cursor: not sent again.
            let mut out = BytesMut::new();
            let ack = Ack {
                packet_id: NonZeroU16::new(3).unwrap(),
                reason: ReasonCode::SUCCESS,
                properties: Properties::default(),
            };
            herald_mqtt::encode(&Packet::PubAck(ack), version, &mut out).unwrap();
            client.write_all(&out).await.unwrap();
            let _ = native(&mut s).await;
            node_says(&mut s, inbox_push(5)).await;
            node_says(&mut s, inbox_push(2)).await;
            assert_eq!(inbox_publishes(&mut client, version).await, [], "{version:?}");
        }
    }

    #[test]
    fn a_will_waits_for_its_delay_or_the_end_of_the_session_whichever_is_first() {
        assert_eq!(will_delay_s(0, u32::MAX), 0);
        assert_eq!(will_delay_s(30, u32::MAX), 30);
        assert_eq!(will_delay_s(30, 10), 10);
        // Session Expiry 0 (or absent): the session ends with the connection.
        assert_eq!(will_delay_s(30, 0), 0);
    }

    #[test]
    fn the_message_expiry_interval_is_the_ttl_left_rounded_up_and_never_0() {
        let now = 1_790_000_000_000;
        assert_eq!(expiry_interval(now + 90_000, now), 90);
        assert_eq!(expiry_interval(now + 89_001, now), 90);
        assert_eq!(expiry_interval(now + 1, now), 1);
        assert_eq!(expiry_interval(now, now), 1);
        assert_eq!(expiry_interval(now - 5_000, now), 1);
        assert_eq!(expiry_interval(u64::MAX, 0), u32::MAX);
    }

    #[tokio::test]
    async fn a_mailbox_message_carries_its_expiry_to_5_0_clients_only() {
        let inbox = |seq, expires_at_ms| {
            Kind::Push(pc::Push {
                session_id: 1,
                seq,
                qos: pc::Qos::AtLeastOnce as i32,
                payload: Bytes::from_static(b"x"),
                expires_at_ms,
                ..Default::default()
            })
        };
        for version in [Version::V5, Version::V311] {
            let (mut client, mut s, _) =
                connected(version, Properties::default(), pc::Welcome::default()).await;
            let now = herald_raft::raft_node::now_ms();
            node_says(&mut s, inbox(1, now + 3_600_000)).await;
            node_says(&mut s, inbox(2, 0)).await;
            node_says(&mut s, topic_push("t", 1)).await;
            let got: Vec<Option<u32>> = client_reads(&mut client, version)
                .await
                .into_iter()
                .filter_map(|p| match p {
                    Packet::Publish(p) => Some(p.properties.message_expiry_interval),
                    _ => None,
                })
                .collect();
            let want = match version {
                // Allow for the seconds this test may take.
                Version::V5 => {
                    assert!(
                        matches!(got[0], Some(s) if (3_590..=3_600).contains(&s)),
                        "{got:?}"
                    );
                    vec![got[0], None, None]
                }
                Version::V311 => vec![None, None, None],
            };
            assert_eq!(got, want, "{version:?}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Outbound aliases against a receiver that resolves them as 5.0 §3.3.2.3.4 says: every
        /// PUBLISH resolves to the topic the node meant, and no alias exceeds the client's maximum.
        #[test]
        fn outbound_aliases_always_resolve_to_the_topic_sent(
            max in 0u16..6,
            topics in proptest::collection::vec(0u8..10, 1..40),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let props = Properties { topic_alias_maximum: Some(max), ..Properties::default() };
                let (mut client, mut s, _) = connected(Version::V5, props, pc::Welcome::default()).await;
                let names: Vec<String> = topics.iter().map(|t| format!("t/{t}")).collect();
                for (i, t) in names.iter().enumerate() {
                    node_says(&mut s, topic_push(t, i as u64 + 1)).await;
                }
                let mut map: HashMap<u16, String> = HashMap::new();
                let mut resolved = Vec::new();
                for p in client_reads(&mut client, Version::V5).await {
                    let Packet::Publish(p) = p else { continue };
                    let topic = match p.properties.topic_alias {
                        Some(a) => {
                            assert!(a >= 1 && a <= max, "alias {a} above the maximum {max}");
                            if p.topic.is_empty() {
                                map.get(&a).cloned().expect("alias set before use")
                            } else {
                                map.insert(a, p.topic.clone());
                                p.topic
                            }
                        }
                        None => p.topic,
                    };
                    resolved.push(topic);
                }
                assert_eq!(resolved, names);
            });
        }

        /// Inbox pushes in any order, repeats included, against a model: a seq is published
        /// at most once with a new packet id, with DUP exactly when it is at or below the
        /// WELCOME's redelivery bound; a repeat of a seq in flight goes out again with its packet
        /// id and DUP; anything at or below the ack cursor is not sent.
        #[test]
        fn dup_follows_the_redelivery_bound_and_resends(
            acked in 0u64..5,
            upto in 0u64..12,
            seqs in proptest::collection::vec(1u64..12, 0..40),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let welcome = pc::Welcome { acked_seq: acked, redelivery_upto: upto, ..Default::default() };
                let (mut client, mut s, _) = connected(Version::V5, Properties::default(), welcome).await;
                let mut want = Vec::new();
                let mut pid_of: HashMap<u64, u16> = HashMap::new();
                let mut max_sent = acked;
                for &seq in &seqs {
                    node_says(&mut s, inbox_push(seq)).await;
                    if seq > max_sent {
                        max_sent = seq;
                        let pid = pid_of.len() as u16 + 1;
                        pid_of.insert(seq, pid);
                        want.push((pid, seq <= upto));
                    } else if let Some(&pid) = pid_of.get(&seq) {
                        want.push((pid, true));
                    }
                }
                assert_eq!(inbox_publishes(&mut client, Version::V5).await, want);
            });
        }

        /// Inbound aliases against a model map: the node gets the topic the model resolves, and
        /// the first alias use the model cannot resolve ends the connection with 0x82 or 0x94.
        #[test]
        fn inbound_aliases_resolve_like_the_spec_or_end_the_connection(
            sends in proptest::collection::vec((0u8..4, proptest::option::of(1u16..36)), 1..30),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let (mut client, mut s, _) =
                    connected(Version::V5, Properties::default(), pc::Welcome::default()).await;
                let mut model: HashMap<u16, String> = HashMap::new();
                let mut want = Vec::new();
                let mut want_close = None;
                for (t, alias) in &sends {
                    // Topic 0 stands for an empty name (only valid with an alias).
                    if *t == 0 && alias.is_none() {
                        continue;
                    }
                    let name = if *t == 0 { String::new() } else { format!("chat/{t}") };
                    client_sends(&mut client, publish(&name, *alias, "p")).await;
                    match alias {
                        Some(a) if *a > TOPIC_ALIAS_MAX => {
                            want_close = Some(ReasonCode::TOPIC_ALIAS_INVALID);
                            break;
                        }
                        Some(a) if name.is_empty() => match model.get(a) {
                            Some(n) => want.push(n.clone()),
                            None => {
                                want_close = Some(ReasonCode::PROTOCOL_ERROR);
                                break;
                            }
                        },
                        Some(a) => {
                            model.insert(*a, name.clone());
                            want.push(name);
                        }
                        None => want.push(name),
                    }
                }
                let frames = native(&mut s).await;
                assert_eq!(published_topics(&frames), want);
                assert_eq!(s.eof, want_close.is_some());
            });
        }

        /// Any bytes after a valid CONNECT: the translator never panics, and what it hands the
        /// connection task is whole native frames.
        #[test]
        fn arbitrary_client_bytes_never_panic(
            v5 in any::<bool>(),
            tail in proptest::collection::vec(any::<u8>(), 0..512),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let version = if v5 { Version::V5 } else { Version::V311 };
                let (mut client, server) = tokio::io::duplex(1 << 16);
                let mut s = MqttStream::new(server, limits());
                let mut bytes = connect(version, Some(&token()));
                bytes.extend_from_slice(&tail);
                client.write_all(&bytes).await.unwrap();
                drop(client);
                let _ = native(&mut s).await;
            });
        }

        /// Any native frames from the connection task: no panic.
        #[test]
        fn arbitrary_node_frames_never_panic(
            v5 in any::<bool>(),
            seqs in proptest::collection::vec((any::<u64>(), any::<bool>(), 0u8..6), 0..64),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let version = if v5 { Version::V5 } else { Version::V311 };
                let (mut client, server) = tokio::io::duplex(1 << 20);
                let mut s = MqttStream::new(server, limits());
                client.write_all(&connect(version, Some(&token()))).await.unwrap();
                let _ = native(&mut s).await;
                for (seq, qos1, kind) in seqs {
                    let kind = match kind {
                        0 => Kind::Push(pc::Push {
                            session_id: 1,
                            seq,
                            qos: qos1 as i32,
                            topic: if seq % 3 == 0 { "t".into() } else { String::new() },
                            ..Default::default()
                        }),
                        1 => Kind::Gap(pc::Gap { session_id: 1, to_seq: seq, ..Default::default() }),
                        2 => Kind::Pong(pc::Pong { id: seq }),
                        3 => Kind::Subscribed(pc::Subscribed { topic: "t".into(), ..Default::default() }),
                        4 => Kind::UpstreamReply(pc::UpstreamReply { request_id: seq, ..Default::default() }),
                        _ => Kind::Welcome(pc::Welcome::default()),
                    };
                    let f = herald_proto::frame::encode_to_bytes(&Frame { kind: Some(kind) });
                    s.write_all(&f).await.unwrap();
                }
                s.flush().await.unwrap();
            });
        }
    }
}
