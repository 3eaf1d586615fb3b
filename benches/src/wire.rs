//! The three wire protocols the load generator speaks, as small allocation-free encoders and
//! parsers: Herald's client frames (docs/PROTOCOL.md), MQTT 3.1.1 and the NATS text protocol.
//!
//! Receivers run at a million deliveries a second on the same two cores as the server under
//! test, so parsing a delivery must cost next to nothing: these walk the bytes in place.

use bytes::{Buf, BufMut, BytesMut};

/// Benchmark payloads start with this, then the send time (unix ns, LE) and a message id (LE).
pub const MAGIC: &[u8; 4] = b"HB01";

/// A payload of `len` bytes (at least 20) carrying its send time and an id.
pub fn payload(len: usize, sent_ns: u64, id: u64) -> Vec<u8> {
    let mut p = Vec::with_capacity(len.max(20));
    p.extend_from_slice(MAGIC);
    p.extend_from_slice(&sent_ns.to_le_bytes());
    p.extend_from_slice(&id.to_le_bytes());
    p.resize(len.max(20), b'x');
    p
}

/// (send time, id) of a benchmark payload.
pub fn stamp(p: &[u8]) -> Option<(u64, u64)> {
    if p.len() < 20 || &p[..4] != MAGIC {
        return None;
    }
    let t = u64::from_le_bytes(p[4..12].try_into().ok()?);
    let id = u64::from_le_bytes(p[12..20].try_into().ok()?);
    Some((t, id))
}

// ---------------------------------------------------------------------------------------------
// protobuf, just enough to walk a Frame without decoding it

fn varint(b: &[u8], i: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    let mut shift = 0;
    loop {
        let byte = *b.get(*i)?;
        *i += 1;
        v |= ((byte & 0x7f) as u64) << shift;
        if byte & 0x80 == 0 {
            return Some(v);
        }
        shift += 7;
        if shift > 63 {
            return None;
        }
    }
}

/// Calls `f(field, wire_type, varint value, bytes)` for every field of a protobuf message.
fn walk<'a>(b: &'a [u8], mut f: impl FnMut(u32, u8, u64, &'a [u8])) -> Option<()> {
    let mut i = 0;
    while i < b.len() {
        let key = varint(b, &mut i)?;
        let (field, wt) = ((key >> 3) as u32, (key & 7) as u8);
        match wt {
            0 => {
                let v = varint(b, &mut i)?;
                f(field, wt, v, &[]);
            }
            1 => {
                i += 8;
                f(field, wt, 0, &[]);
            }
            2 => {
                let n = varint(b, &mut i)? as usize;
                let s = b.get(i..i + n)?;
                i += n;
                f(field, wt, 0, s);
            }
            5 => {
                i += 4;
                f(field, wt, 0, &[]);
            }
            _ => return None,
        }
    }
    Some(())
}

/// What the generator needs from one Herald frame.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct HeraldIn<'a> {
    /// The `Frame` oneof arm (field number): 5 = PUSH, 2 = WELCOME, 11 = SUBSCRIBED, 15 = ERROR, …
    pub kind: u32,
    pub session_id: u32,
    /// Mailbox seq of a PUSH (0 for topic messages).
    pub seq: u64,
    pub payload: &'a [u8],
    /// ERROR code, SUBSCRIBED error or KICKED code.
    pub code: u64,
}

pub const K_WELCOME: u32 = 2;
pub const K_PUSH: u32 = 5;
pub const K_SUBSCRIBED: u32 = 11;
pub const K_KICKED: u32 = 13;
pub const K_BYE: u32 = 14;
pub const K_ERROR: u32 = 15;

/// Parses a frame body (after the length prefix). Repeated occurrences of the oneof arm are
/// merged, as protobuf requires (the server sends a topic PUSH as a per-session head and a shared
/// body).
pub fn herald_parse(body: &[u8]) -> Option<HeraldIn<'_>> {
    let mut out = HeraldIn::default();
    walk(body, |field, wt, _, inner| {
        if wt != 2 {
            return;
        }
        out.kind = field;
        let _ = walk(inner, |f, _, v, bytes| match (field, f) {
            (_, 1) => out.session_id = v as u32,
            (K_PUSH, 3) => out.seq = v,
            (K_PUSH, 6) => out.payload = bytes,
            (K_SUBSCRIBED, 4) | (K_KICKED, 4) | (K_ERROR, 2) => out.code = v,
            _ => {}
        });
    })?;
    Some(out)
}

/// Splits complete Herald frames (4-byte big-endian length + body) off the front of `buf`.
pub fn herald_next_frame(buf: &mut BytesMut, max: usize) -> Result<Option<BytesMut>, String> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let n = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if n > max {
        return Err(format!("frame of {n} bytes"));
    }
    if buf.len() < 4 + n {
        buf.reserve(4 + n - buf.len());
        return Ok(None);
    }
    buf.advance(4);
    Ok(Some(buf.split_to(n)))
}

// ---------------------------------------------------------------------------------------------
// MQTT 3.1.1

fn mqtt_len(dst: &mut Vec<u8>, mut n: usize) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        dst.push(b);
        if n == 0 {
            break;
        }
    }
}

fn mqtt_str(dst: &mut Vec<u8>, s: &[u8]) {
    dst.put_u16(s.len() as u16);
    dst.extend_from_slice(s);
}

/// CONNECT with a clean session, no keep-alive (idle connections stay), user and password.
pub fn mqtt_connect(client_id: &str, user: &str, pass: &str) -> Vec<u8> {
    let mut body = Vec::new();
    mqtt_str(&mut body, b"MQTT");
    body.push(4); // protocol level 3.1.1
    body.push(0x80 | 0x40 | 0x02); // username, password, clean session
    body.put_u16(0); // keep-alive off
    mqtt_str(&mut body, client_id.as_bytes());
    mqtt_str(&mut body, user.as_bytes());
    mqtt_str(&mut body, pass.as_bytes());
    let mut p = vec![0x10];
    mqtt_len(&mut p, body.len());
    p.extend_from_slice(&body);
    p
}

/// SUBSCRIBE to one topic at QoS 0.
pub fn mqtt_subscribe(packet_id: u16, topic: &str) -> Vec<u8> {
    let mut body = Vec::new();
    body.put_u16(packet_id);
    mqtt_str(&mut body, topic.as_bytes());
    body.push(0);
    let mut p = vec![0x82];
    mqtt_len(&mut p, body.len());
    p.extend_from_slice(&body);
    p
}

/// PUBLISH at QoS 0.
pub fn mqtt_publish(dst: &mut Vec<u8>, topic: &str, payload: &[u8]) {
    dst.push(0x30);
    mqtt_len(dst, 2 + topic.len() + payload.len());
    mqtt_str(dst, topic.as_bytes());
    dst.extend_from_slice(payload);
}

/// One MQTT packet from the front of `buf`: (packet type byte, body).
pub fn mqtt_next(buf: &mut BytesMut) -> Option<(u8, BytesMut)> {
    let mut n = 0usize;
    let mut mult = 1usize;
    let mut i = 1;
    loop {
        let b = *buf.get(i)?;
        n += (b & 0x7f) as usize * mult;
        mult *= 128;
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        if i > 4 {
            return None;
        }
    }
    if buf.len() < i + n {
        buf.reserve(i + n - buf.len());
        return None;
    }
    let t = buf[0];
    buf.advance(i);
    Some((t, buf.split_to(n)))
}

/// The payload of a PUBLISH body (`t` is the fixed header's first byte).
pub fn mqtt_publish_payload(t: u8, body: &[u8]) -> Option<&[u8]> {
    let tl = u16::from_be_bytes([*body.first()?, *body.get(1)?]) as usize;
    let mut i = 2 + tl;
    if (t >> 1) & 3 > 0 {
        i += 2; // packet id at QoS > 0
    }
    body.get(i..)
}

// ---------------------------------------------------------------------------------------------
// NATS

/// What the NATS parser found at the front of the buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum NatsIn {
    /// MSG: the number after the subject's last dot (0 if none: an inbox ends in one, which is
    /// how acks are matched to requests without copying the subject), and the payload.
    Msg {
        tag: u64,
        payload: BytesMut,
    },
    Ping,
    Pong,
    Ok,
    Err(String),
    Info,
}

/// One NATS protocol message from the front of `buf`.
pub fn nats_next(buf: &mut BytesMut) -> Result<Option<NatsIn>, String> {
    let Some(eol) = memchr::memmem::find(buf, b"\r\n") else {
        return Ok(None);
    };
    let line = &buf[..eol];
    if line.starts_with(b"MSG ") {
        let rest = &line[4..];
        let subject = rest.split(|c| *c == b' ').next().unwrap_or(&[]);
        let size = rest.rsplit(|c| *c == b' ').next().unwrap_or(&[]);
        let n =
            digits(size).ok_or_else(|| format!("bad MSG line {:?}", String::from_utf8_lossy(line)))? as usize;
        let tag = subject
            .rsplit(|c| *c == b'.')
            .next()
            .and_then(digits)
            .unwrap_or(0);
        if buf.len() < eol + 2 + n + 2 {
            buf.reserve(eol + 4 + n - buf.len());
            return Ok(None);
        }
        buf.advance(eol + 2);
        let payload = buf.split_to(n);
        buf.advance(2);
        return Ok(Some(NatsIn::Msg { tag, payload }));
    }
    let m = if line == b"PING" {
        NatsIn::Ping
    } else if line == b"PONG" {
        NatsIn::Pong
    } else if line == b"+OK" {
        NatsIn::Ok
    } else if line.starts_with(b"-ERR") {
        NatsIn::Err(String::from_utf8_lossy(line).into_owned())
    } else if line.starts_with(b"INFO") {
        NatsIn::Info
    } else {
        return Err(format!("unexpected {:?}", String::from_utf8_lossy(line)));
    };
    buf.advance(eol + 2);
    Ok(Some(m))
}

fn digits(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 19 {
        return None;
    }
    let mut v = 0u64;
    for c in s {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v * 10 + (c - b'0') as u64;
    }
    Some(v)
}

/// CONNECT (no echo of our own messages, no +OK) followed by a PING to learn it was accepted.
pub fn nats_connect(user: &str, pass: &str, name: &str) -> Vec<u8> {
    let c = serde_json::json!({
        "verbose": false, "pedantic": false, "user": user, "pass": pass, "echo": false,
        "name": name, "lang": "rust", "version": "0", "protocol": 1, "headers": false,
    });
    format!("CONNECT {c}\r\n").into_bytes()
}

pub fn nats_pub(dst: &mut Vec<u8>, subject: &str, reply: &str, payload: &[u8]) {
    dst.extend_from_slice(b"PUB ");
    dst.extend_from_slice(subject.as_bytes());
    dst.push(b' ');
    if !reply.is_empty() {
        dst.extend_from_slice(reply.as_bytes());
        dst.push(b' ');
    }
    dst.extend_from_slice(payload.len().to_string().as_bytes());
    dst.extend_from_slice(b"\r\n");
    dst.extend_from_slice(payload);
    dst.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_proto::client::{frame::Kind, Frame, Push};
    use prost::Message;

    #[test]
    fn a_push_is_walked_like_prost_decodes_it() {
        let p = payload(100, 123, 9);
        let f = Frame {
            kind: Some(Kind::Push(Push {
                session_id: 3,
                msg_id: "m".into(),
                seq: 77,
                topic: "t".into(),
                payload: p.clone().into(),
                ..Default::default()
            })),
        };
        let body = f.encode_to_vec();
        let h = herald_parse(&body).unwrap();
        assert_eq!((h.kind, h.session_id, h.seq), (K_PUSH, 3, 77));
        assert_eq!(stamp(h.payload), Some((123, 9)));
    }

    #[test]
    fn mqtt_publish_round_trips() {
        let mut v = Vec::new();
        mqtt_publish(&mut v, "bench", &[7u8; 300]);
        let mut b = BytesMut::from(&v[..]);
        let (t, body) = mqtt_next(&mut b).unwrap();
        assert_eq!(t & 0xf0, 0x30);
        assert_eq!(mqtt_publish_payload(t, &body).unwrap(), &[7u8; 300][..]);
        assert!(b.is_empty());
    }

    #[test]
    fn nats_msg_parses_whole_or_waits() {
        let mut b = BytesMut::from(&b"MSG _INBOX.x.42 1 5\r\nhel"[..]);
        assert_eq!(nats_next(&mut b).unwrap(), None);
        b.extend_from_slice(b"lo\r\nPING\r\n");
        match nats_next(&mut b).unwrap() {
            Some(NatsIn::Msg { tag, payload }) => {
                assert_eq!(tag, 42);
                assert_eq!(&payload[..], b"hello");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(nats_next(&mut b).unwrap(), Some(NatsIn::Ping));
    }
}
