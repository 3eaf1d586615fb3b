//! Decoding one packet from a stream buffer and encoding one packet onto an output buffer.

use bytes::{Buf, BytesMut};

use crate::error::{DecodeError, EncodeError};
use crate::header::{peek_header, put_header, PacketType};
use crate::packet::{
    Ack, Auth, ConnAck, Connect, Disconnect, Packet, Publish, SubAck, Subscribe, UnsubAck, Unsubscribe,
};
use crate::wire::Reader;
use crate::Version;

/// Decodes the packet at the start of `buf`.
///
/// - `Ok(None)`: the packet is not complete; `buf` is untouched. Read more bytes and call again.
/// - `Ok(Some(packet))`: exactly that packet's bytes were consumed from `buf`; binary fields and
///   the PUBLISH payload share `buf`'s allocation (no copy).
/// - `Err(_)`: the connection must be closed (after a CONNACK or DISCONNECT naming
///   [`DecodeError::reason_code`]); what is left in `buf` is unspecified.
///
/// `version` is `None` until the CONNECT: then only a CONNECT is accepted, and its
/// [`Connect::version`] is what to pass from then on; a second CONNECT is a protocol error.
///
/// `max_packet` bounds the whole packet, fixed header included (MQTT 5.0's Maximum Packet Size).
/// A larger packet is refused from its fixed header alone, before its body arrives, so it is
/// never buffered. The first byte is checked as soon as it arrives.
pub fn decode(
    buf: &mut BytesMut,
    version: Option<Version>,
    max_packet: usize,
) -> Result<Option<Packet>, DecodeError> {
    let Some(header) = peek_header(buf, version)? else {
        return Ok(None);
    };
    let size = header.packet_len();
    if size > max_packet {
        return Err(DecodeError::PacketTooLarge {
            size,
            max: max_packet,
        });
    }
    if buf.len() < size {
        return Ok(None);
    }
    let mut bytes = buf.split_to(size).freeze();
    bytes.advance(header.header_len);
    let r = &mut Reader::new(bytes);
    let Some(v) = version else {
        // peek_header let only a CONNECT through.
        return Ok(Some(Packet::Connect(Connect::read(r)?)));
    };
    let packet = match header.packet_type {
        PacketType::Connect => Packet::Connect(Connect::read(r)?),
        PacketType::ConnAck => Packet::ConnAck(ConnAck::read(r, v)?),
        PacketType::Publish => Packet::Publish(Publish::read(r, header.flags, v)?),
        PacketType::PubAck => Packet::PubAck(Ack::read(r, PacketType::PubAck, v)?),
        PacketType::PubRec => Packet::PubRec(Ack::read(r, PacketType::PubRec, v)?),
        PacketType::PubRel => Packet::PubRel(Ack::read(r, PacketType::PubRel, v)?),
        PacketType::PubComp => Packet::PubComp(Ack::read(r, PacketType::PubComp, v)?),
        PacketType::Subscribe => Packet::Subscribe(Subscribe::read(r, v)?),
        PacketType::SubAck => Packet::SubAck(SubAck::read(r, v)?),
        PacketType::Unsubscribe => Packet::Unsubscribe(Unsubscribe::read(r, v)?),
        PacketType::UnsubAck => Packet::UnsubAck(UnsubAck::read(r, v)?),
        PacketType::PingReq => {
            r.finish()?;
            Packet::PingReq
        }
        PacketType::PingResp => {
            r.finish()?;
            Packet::PingResp
        }
        PacketType::Disconnect => Packet::Disconnect(Disconnect::read(r, v)?),
        PacketType::Auth => Packet::Auth(Auth::read(r)?),
    };
    Ok(Some(packet))
}

/// Encodes `packet` as MQTT `version` onto the end of `out`.
///
/// The packet is checked first with the rules a receiver applies (as [`decode`] does), so a
/// packet this refuses would have been refused by the peer; on error nothing is written.
pub fn encode(packet: &Packet, version: Version, out: &mut BytesMut) -> Result<(), EncodeError> {
    let (flags, len) = match packet {
        Packet::Connect(p) => {
            p.check(version)?;
            (0, p.body_len())
        }
        Packet::ConnAck(p) => {
            p.check(version)?;
            (0, p.body_len(version))
        }
        Packet::Publish(p) => {
            p.check(version)?;
            (p.flags(), p.body_len(version))
        }
        Packet::PubAck(p) | Packet::PubRec(p) | Packet::PubRel(p) | Packet::PubComp(p) => {
            p.check(packet.packet_type(), version)?;
            (0, p.body_len(version))
        }
        Packet::Subscribe(p) => {
            p.check(version)?;
            (0, p.body_len(version))
        }
        Packet::SubAck(p) => {
            p.check(version)?;
            (0, p.body_len(version))
        }
        Packet::Unsubscribe(p) => {
            p.check(version)?;
            (0, p.body_len(version))
        }
        Packet::UnsubAck(p) => {
            p.check(version)?;
            (0, p.body_len(version))
        }
        Packet::PingReq | Packet::PingResp => (0, 0),
        Packet::Disconnect(p) => {
            p.check(version)?;
            (0, p.body_len(version))
        }
        Packet::Auth(p) => {
            p.check(version)?;
            (0, p.body_len())
        }
    };
    put_header(out, packet.packet_type(), flags, len)?;
    let start = out.len();
    match packet {
        Packet::Connect(p) => p.write(out),
        Packet::ConnAck(p) => p.write(version, out),
        Packet::Publish(p) => p.write(version, out),
        Packet::PubAck(p) | Packet::PubRec(p) | Packet::PubRel(p) | Packet::PubComp(p) => {
            p.write(version, out)
        }
        Packet::Subscribe(p) => p.write(version, out),
        Packet::SubAck(p) => p.write(version, out),
        Packet::Unsubscribe(p) => p.write(version, out),
        Packet::UnsubAck(p) => p.write(version, out),
        Packet::PingReq | Packet::PingResp => {}
        Packet::Disconnect(p) => p.write(version, out),
        Packet::Auth(p) => p.write(out),
    }
    debug_assert_eq!(
        out.len() - start,
        len,
        "body_len and write disagree for {:?}",
        packet.packet_type()
    );
    Ok(())
}
