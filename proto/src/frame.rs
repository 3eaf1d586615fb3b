//! Client frame codec: a 4-byte big-endian length, then a protobuf [`Frame`](crate::client::Frame).
//!
//! The decoder is incremental and never allocates more than the announced length, which it checks
//! against the maximum frame size before reading the body.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;

use crate::client::Frame;

/// Length prefix size in bytes.
pub const HEADER_LEN: usize = 4;

/// Default maximum frame body size (bytes after the length prefix).
pub const DEFAULT_MAX_FRAME: usize = 64 * 1024;

/// Bytes a server-sent PUSH or UPSTREAM_REPLY frame may need besides its payload, with every id
/// and name at its 256-byte maximum (tested below). A payload fits in a frame of `max` bytes when
/// it is at most `max - PUSH_HEADROOM`.
pub const PUSH_HEADROOM: usize = 1024;

/// Why a byte stream could not be decoded into frames. Each one closes the connection.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// The length prefix announces more than the allowed maximum.
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    TooLarge { len: usize, max: usize },
    /// The body is not a valid protobuf `Frame`.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// A frame decoded but carries no known kind.
    #[error("frame has no kind")]
    Empty,
}

/// Encodes one frame (prefix and body) onto `dst`.
pub fn encode(frame: &Frame, dst: &mut BytesMut) {
    let len = frame.encoded_len();
    dst.reserve(HEADER_LEN + len);
    dst.put_u32(len as u32);
    // Encoding into a BytesMut with reserved capacity cannot fail.
    frame.encode(dst).expect("reserved capacity");
}

/// Appends one frame (prefix and body) to `dst`.
pub fn encode_into_vec(frame: &Frame, dst: &mut Vec<u8>) {
    let len = frame.encoded_len();
    dst.reserve(HEADER_LEN + len);
    dst.extend_from_slice(&(len as u32).to_be_bytes());
    // Encoding into a Vec cannot fail.
    frame.encode(dst).expect("vec grows");
}

/// Encodes one frame into its own buffer.
pub fn encode_to_bytes(frame: &Frame) -> Bytes {
    let mut b = BytesMut::with_capacity(HEADER_LEN + frame.encoded_len());
    encode(frame, &mut b);
    b.freeze()
}

/// Reads the announced body length of the frame at the start of `src`, if the prefix is complete.
pub fn peek_len(src: &[u8]) -> Option<usize> {
    if src.len() < HEADER_LEN {
        return None;
    }
    Some(u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize)
}

/// Tries to decode one frame from the start of `src`, consuming it on success.
///
/// Returns `Ok(None)` when more bytes are needed. A length over `max` is an error even before the
/// body arrives, so a peer cannot make the reader buffer it.
pub fn decode(src: &mut BytesMut, max: usize) -> Result<Option<Frame>, FrameError> {
    let Some(len) = peek_len(src) else {
        return Ok(None);
    };
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    if src.len() < HEADER_LEN + len {
        return Ok(None);
    }
    src.advance(HEADER_LEN);
    let body = src.split_to(len);
    let frame = Frame::decode(body.freeze()).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if frame.kind.is_none() {
        return Err(FrameError::Empty);
    }
    Ok(Some(frame))
}

/// Decodes one frame body (without prefix); for transports that frame messages themselves
/// (WebSocket binary messages carry the same prefix and body, see PROTOCOL.md).
pub fn decode_body(body: Bytes) -> Result<Frame, FrameError> {
    let frame = Frame::decode(body).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if frame.kind.is_none() {
        return Err(FrameError::Empty);
    }
    Ok(frame)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{
        frame::Kind, Ack, Bye, CloseSession, Error, Gap, GetRetained, Hello, Keep, KeptSubscription, Kicked,
        OpenSession, Ping, Pong, PublishTopic, Push, Qos, RefreshToken, SessionClosed, Subscribe, Subscribed,
        TopicCursor, TopicPublished, Unsubscribe, Upstream, UpstreamReply, Welcome,
    };
    use proptest::prelude::*;

    fn push(seq: u64, payload: Vec<u8>) -> Frame {
        Frame {
            kind: Some(Kind::Push(Push {
                session_id: 1,
                msg_id: format!("m{seq}"),
                seq,
                payload: payload.into(),
                qos: Qos::AtLeastOnce as i32,
                ..Default::default()
            })),
        }
    }

    #[test]
    fn partial_input_waits_for_more() {
        let bytes = encode_to_bytes(&push(7, vec![1, 2, 3]));
        for cut in 0..bytes.len() {
            let mut b = BytesMut::from(&bytes[..cut]);
            assert_eq!(decode(&mut b, DEFAULT_MAX_FRAME), Ok(None), "cut at {cut}");
            assert_eq!(b.len(), cut, "nothing consumed on a partial frame");
        }
    }

    #[test]
    fn oversized_prefix_is_refused_before_the_body_arrives() {
        let mut b = BytesMut::new();
        b.put_u32(1_000_000);
        assert_eq!(
            decode(&mut b, 1024),
            Err(FrameError::TooLarge {
                len: 1_000_000,
                max: 1024
            })
        );
    }

    #[test]
    fn empty_body_is_an_error() {
        let mut b = BytesMut::new();
        b.put_u32(0);
        assert_eq!(decode(&mut b, 1024), Err(FrameError::Empty));
    }

    fn name() -> impl Strategy<Value = String> {
        "[a-z0-9:_-]{0,24}"
    }

    fn blob() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(any::<u8>(), 0..300)
    }

    fn cursor() -> impl Strategy<Value = TopicCursor> {
        (name(), proptest::option::of(any::<u64>()))
            .prop_map(|(topic, last_seq)| TopicCursor { topic, last_seq })
    }

    fn open() -> impl Strategy<Value = OpenSession> {
        (
            any::<u32>(),
            (name(), name(), name(), name(), name()),
            any::<u64>(),
            proptest::collection::vec(cursor(), 0..4),
            proptest::option::of((any::<bool>(), any::<u32>())),
        )
            .prop_map(
                |(session_id, (app, user, device, platform, token), last_acked_seq, topics, keep)| {
                    OpenSession {
                        session_id,
                        app,
                        user,
                        device,
                        platform,
                        token,
                        last_acked_seq,
                        topics,
                        keep: keep.map(|(clean, expiry_s)| Keep { clean, expiry_s }),
                    }
                },
            )
    }

    /// Every kind of frame, each with arbitrary field values.
    fn arb_frame() -> impl Strategy<Value = Frame> {
        let code = 0i32..20;
        let kinds: Vec<BoxedStrategy<Kind>> = vec![
            (any::<u32>(), open(), name(), any::<u32>())
                .prop_map(|(version, s, client, heartbeat_ms)| {
                    Kind::Hello(Hello {
                        version,
                        session: Some(s),
                        client,
                        heartbeat_ms,
                    })
                })
                .boxed(),
            (
                any::<(u32, u64, u64, u32, u32, u32, u32, u32, u64)>(),
                proptest::collection::vec((name(), any::<u32>()), 0..3),
            )
                .prop_map(|((a, b, c, d, e, f, g, h, i), kept)| {
                    Kind::Welcome(Welcome {
                        session_id: a,
                        epoch: b,
                        node_id: c,
                        heartbeat_ms: d,
                        heartbeat_min_ms: e,
                        heartbeat_max_ms: f,
                        max_frame: g,
                        version: h,
                        acked_seq: i,
                        redelivery_upto: i.wrapping_add(b),
                        session_present: !kept.is_empty(),
                        subscriptions: kept
                            .into_iter()
                            .map(|(topic, options)| KeptSubscription { topic, options })
                            .collect(),
                    })
                })
                .boxed(),
            (any::<u64>(), any::<u32>())
                .prop_map(|(id, interval_ms)| Kind::Ping(Ping { id, interval_ms }))
                .boxed(),
            any::<u64>().prop_map(|id| Kind::Pong(Pong { id })).boxed(),
            (
                any::<(u32, u64, u64, u64)>(),
                name(),
                name(),
                blob(),
                0i32..2,
                0i32..3,
            )
                .prop_map(
                    |((session_id, seq, topic_seq, pushed_at_ms), msg_id, topic, p, qos, retain)| {
                        Kind::Push(Push {
                            session_id,
                            msg_id,
                            seq,
                            topic,
                            topic_seq,
                            payload: p.into(),
                            qos,
                            pushed_at_ms,
                            expires_at_ms: pushed_at_ms.wrapping_add(seq),
                            retain,
                        })
                    },
                )
                .boxed(),
            (any::<u32>(), any::<u64>())
                .prop_map(|(session_id, seq)| Kind::Ack(Ack { session_id, seq }))
                .boxed(),
            (any::<u32>(), any::<u64>(), blob())
                .prop_map(|(session_id, request_id, p)| {
                    Kind::Upstream(Upstream {
                        session_id,
                        request_id,
                        payload: p.into(),
                    })
                })
                .boxed(),
            (any::<u32>(), any::<u64>(), blob(), code.clone(), name())
                .prop_map(|(session_id, request_id, p, error, message)| {
                    Kind::UpstreamReply(UpstreamReply {
                        session_id,
                        request_id,
                        payload: p.into(),
                        error,
                        message,
                    })
                })
                .boxed(),
            (
                any::<u32>(),
                name(),
                proptest::option::of(any::<u64>()),
                any::<u32>(),
            )
                .prop_map(|(session_id, topic, last_seq, options)| {
                    Kind::Subscribe(Subscribe {
                        session_id,
                        topic,
                        last_seq,
                        options,
                    })
                })
                .boxed(),
            (any::<u32>(), name())
                .prop_map(|(session_id, topic)| Kind::Unsubscribe(Unsubscribe { session_id, topic }))
                .boxed(),
            (any::<u32>(), name(), any::<u64>(), code.clone(), name())
                .prop_map(|(session_id, topic, seq, error, message)| {
                    Kind::Subscribed(Subscribed {
                        session_id,
                        topic,
                        seq,
                        error,
                        message,
                    })
                })
                .boxed(),
            (any::<(u32, u64, u64)>(), name(), 0i32..3)
                .prop_map(|((session_id, from_seq, to_seq), topic, reason)| {
                    Kind::Gap(Gap {
                        session_id,
                        topic,
                        from_seq,
                        to_seq,
                        reason,
                    })
                })
                .boxed(),
            (
                any::<u32>(),
                name(),
                proptest::collection::vec(name(), 0..3),
                0i32..6,
            )
                .prop_map(|(session_id, reason, redirect, code)| {
                    Kind::Kicked(Kicked {
                        session_id,
                        reason,
                        redirect,
                        code,
                    })
                })
                .boxed(),
            (name(), proptest::collection::vec(name(), 0..3))
                .prop_map(|(reason, redirect)| Kind::Bye(Bye { reason, redirect }))
                .boxed(),
            (any::<u32>(), code, name())
                .prop_map(|(session_id, code, message)| {
                    Kind::Error(Error {
                        session_id,
                        code,
                        message,
                    })
                })
                .boxed(),
            open().prop_map(Kind::OpenSession).boxed(),
            (any::<u32>(), proptest::option::of(any::<u32>()))
                .prop_map(|(session_id, expiry_s)| Kind::CloseSession(CloseSession { session_id, expiry_s }))
                .boxed(),
            (any::<u32>(), name())
                .prop_map(|(session_id, reason)| Kind::SessionClosed(SessionClosed { session_id, reason }))
                .boxed(),
            (any::<u32>(), name())
                .prop_map(|(session_id, token)| Kind::RefreshToken(RefreshToken { session_id, token }))
                .boxed(),
            (any::<(u32, u64, bool, u64)>(), name(), blob())
                .prop_map(|((session_id, request_id, retain, retain_ttl_ms), topic, p)| {
                    Kind::PublishTopic(PublishTopic {
                        session_id,
                        request_id,
                        topic,
                        payload: p.into(),
                        retain,
                        retain_ttl_ms,
                    })
                })
                .boxed(),
            (any::<(u32, u64, u64)>(), 0i32..20, name())
                .prop_map(|((session_id, request_id, topic_seq), error, message)| {
                    Kind::TopicPublished(TopicPublished {
                        session_id,
                        request_id,
                        topic_seq,
                        error,
                        message,
                    })
                })
                .boxed(),
            (any::<u32>(), name())
                .prop_map(|(session_id, filter)| Kind::GetRetained(GetRetained { session_id, filter }))
                .boxed(),
        ];
        proptest::strategy::Union::new(kinds).prop_map(|k| Frame { kind: Some(k) })
    }

    #[test]
    fn the_generator_covers_every_kind_of_frame() {
        use proptest::strategy::ValueTree;
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..2000 {
            let f = arb_frame().new_tree(&mut runner).unwrap().current();
            let tag = encode_to_bytes(&f)[HEADER_LEN] >> 3;
            seen.insert(tag);
        }
        assert_eq!(seen, (1u8..=22).collect(), "field numbers 1..=22 of Frame.kind");
    }

    #[test]
    fn a_payload_within_the_headroom_fits_in_the_frame() {
        let long = "x".repeat(256);
        for max in [
            256usize + PUSH_HEADROOM,
            4096,
            DEFAULT_MAX_FRAME,
            16 * 1024 * 1024,
        ] {
            let payload = vec![0xAB; max - PUSH_HEADROOM];
            let push = Frame {
                kind: Some(Kind::Push(Push {
                    session_id: u32::MAX,
                    msg_id: long.clone(),
                    seq: u64::MAX,
                    topic: long.clone(),
                    topic_seq: u64::MAX,
                    payload: payload.clone().into(),
                    qos: Qos::AtLeastOnce as i32,
                    pushed_at_ms: u64::MAX,
                    expires_at_ms: u64::MAX,
                    retain: crate::client::Retain::Stored as i32,
                })),
            };
            let reply = Frame {
                kind: Some(Kind::UpstreamReply(UpstreamReply {
                    session_id: u32::MAX,
                    request_id: u64::MAX,
                    payload: payload.into(),
                    error: 0,
                    message: String::new(),
                })),
            };
            for f in [push, reply] {
                let body = encode_to_bytes(&f).len() - HEADER_LEN;
                assert!(body <= max, "{body} > {max}");
                let mut b = BytesMut::from(&encode_to_bytes(&f)[..]);
                assert_eq!(decode(&mut b, max).unwrap(), Some(f));
            }
        }
    }

    proptest! {
        #[test]
        fn round_trip_of_frame_sequences(frames in proptest::collection::vec(arb_frame(), 1..20), split in 1usize..64) {
            let mut wire = BytesMut::new();
            for f in &frames {
                encode(f, &mut wire);
            }
            // Feed the stream in pieces of `split` bytes, as a socket would.
            let wire = wire.freeze();
            let mut buf = BytesMut::new();
            let mut out = Vec::new();
            for chunk in wire.chunks(split) {
                buf.extend_from_slice(chunk);
                while let Some(f) = decode(&mut buf, DEFAULT_MAX_FRAME).unwrap() {
                    out.push(f);
                }
            }
            prop_assert_eq!(out, frames);
            prop_assert!(buf.is_empty());
        }

        #[test]
        fn decoder_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let mut buf = BytesMut::from(&bytes[..]);
            // Either frames, a clean error, or a request for more bytes; never a panic or a loop.
            for _ in 0..bytes.len() + 1 {
                match decode(&mut buf, 512) {
                    Ok(Some(_)) => continue,
                    Ok(None) | Err(_) => break,
                }
            }
        }
    }
}
