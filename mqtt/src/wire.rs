//! The spec's data representations (MQTT 3.1.1 §1.5, 5.0 §1.5): two- and four-byte integers,
//! Variable Byte Integers, length-prefixed UTF-8 strings and binary data.
//!
//! [`Reader`] reads them from the body of one packet whose bytes have all arrived, so running out
//! of bytes there means the packet's Remaining Length lied: a malformed packet, never "need more".
//! Binary data is split from the packet's `Bytes` without a copy.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::Malformed;

/// The largest value a Variable Byte Integer can hold (four bytes, 5.0 §1.5.5).
pub const VARINT_MAX: u32 = 268_435_455;

/// The longest UTF-8 string or binary data: its length is a two-byte integer.
pub const STRING_MAX: usize = u16::MAX as usize;

/// What reading a Variable Byte Integer from a prefix of a stream found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum VarintPeek {
    /// The value and how many bytes encode it.
    Done(u32, usize),
    /// Every byte so far has its continuation bit set and fewer than four arrived.
    Incomplete,
}

/// Reads a Variable Byte Integer from the start of `src`, which may be a prefix of the stream.
///
/// Refuses a fourth byte with its continuation bit set (a fifth byte would be needed) and a
/// non-minimal encoding (a last byte of zero after the first): the spec requires "the minimum
/// number of bytes necessary".
pub(crate) fn peek_varint(src: &[u8]) -> Result<VarintPeek, Malformed> {
    let mut value: u32 = 0;
    for (i, &byte) in src.iter().take(4).enumerate() {
        value |= u32::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            if i > 0 && byte == 0 {
                return Err(Malformed::VarintNotMinimal);
            }
            return Ok(VarintPeek::Done(value, i + 1));
        }
    }
    if src.len() >= 4 {
        Err(Malformed::VarintTooLong)
    } else {
        Ok(VarintPeek::Incomplete)
    }
}

/// How many bytes the Variable Byte Integer encoding of `value` takes (`value` ≤ [`VARINT_MAX`]).
pub(crate) fn varint_len(value: u32) -> usize {
    match value {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// Writes `value` (≤ [`VARINT_MAX`], checked by the caller) as a Variable Byte Integer.
pub(crate) fn put_varint(out: &mut BytesMut, mut value: u32) {
    loop {
        let mut byte = (value % 128) as u8;
        value /= 128;
        if value > 0 {
            byte |= 0x80;
        }
        out.put_u8(byte);
        if value == 0 {
            return;
        }
    }
}

/// Writes a length-prefixed UTF-8 string (length ≤ [`STRING_MAX`], checked by the caller).
pub(crate) fn put_str(out: &mut BytesMut, s: &str) {
    put_binary(out, s.as_bytes());
}

/// Writes length-prefixed binary data (length ≤ [`STRING_MAX`], checked by the caller).
pub(crate) fn put_binary(out: &mut BytesMut, b: &[u8]) {
    out.put_u16(b.len() as u16);
    out.put_slice(b);
}

/// Checks the rules of an MQTT UTF-8 string that Rust's `str` does not: no U+0000 (3.1.1
/// [MQTT-1.5.3-2], 5.0 [MQTT-1.5.4-2]). Ill-formed UTF-8 and surrogates are refused by
/// `str::from_utf8` already.
pub(crate) fn check_str(s: &str) -> Result<(), Malformed> {
    if s.contains('\0') {
        return Err(Malformed::NullCharacter);
    }
    Ok(())
}

/// Reads the fields of one complete packet body.
#[derive(Debug)]
pub(crate) struct Reader {
    /// The bytes not read yet; binary fields are split off it without a copy.
    buf: Bytes,
}

impl Reader {
    pub(crate) fn new(buf: Bytes) -> Self {
        Reader { buf }
    }

    /// Bytes not read yet.
    pub(crate) fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Refuses bytes left over after the last field of a packet.
    pub(crate) fn finish(&self) -> Result<(), Malformed> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(Malformed::TrailingBytes(self.buf.len()))
        }
    }

    fn need(&self, n: usize) -> Result<(), Malformed> {
        if self.buf.len() < n {
            Err(Malformed::Truncated)
        } else {
            Ok(())
        }
    }

    pub(crate) fn u8(&mut self) -> Result<u8, Malformed> {
        self.need(1)?;
        Ok(self.buf.get_u8())
    }

    pub(crate) fn u16(&mut self) -> Result<u16, Malformed> {
        self.need(2)?;
        Ok(self.buf.get_u16())
    }

    pub(crate) fn u32(&mut self) -> Result<u32, Malformed> {
        self.need(4)?;
        Ok(self.buf.get_u32())
    }

    pub(crate) fn varint(&mut self) -> Result<u32, Malformed> {
        match peek_varint(&self.buf)? {
            VarintPeek::Done(value, len) => {
                self.buf.advance(len);
                Ok(value)
            }
            VarintPeek::Incomplete => Err(Malformed::Truncated),
        }
    }

    /// Splits off the next `n` bytes without a copy.
    pub(crate) fn take(&mut self, n: usize) -> Result<Bytes, Malformed> {
        self.need(n)?;
        Ok(self.buf.split_to(n))
    }

    /// Everything not read yet (a PUBLISH payload), without a copy.
    pub(crate) fn rest(&mut self) -> Bytes {
        self.buf.split_to(self.buf.len())
    }

    /// Length-prefixed binary data.
    pub(crate) fn binary(&mut self) -> Result<Bytes, Malformed> {
        let len = self.u16()?;
        self.take(usize::from(len))
    }

    /// A length-prefixed UTF-8 string (5.0 §1.5.4): well-formed UTF-8 without U+0000.
    pub(crate) fn string(&mut self) -> Result<String, Malformed> {
        let bytes = self.binary()?;
        let s = std::str::from_utf8(&bytes).map_err(|_| Malformed::InvalidUtf8)?;
        check_str(s)?;
        Ok(s.to_owned())
    }

    /// A Variable Byte Integer length followed by that many bytes, read by a reader of their own
    /// (the properties of a packet).
    pub(crate) fn sub_reader(&mut self) -> Result<Reader, Malformed> {
        let len = self.varint()?;
        let len = usize::try_from(len).map_err(|_| Malformed::Truncated)?;
        Ok(Reader::new(self.take(len)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_refuses_a_fourth_byte_with_continuation() {
        assert_eq!(
            peek_varint(&[0xff, 0xff, 0xff, 0xff, 0x01]),
            Err(Malformed::VarintTooLong)
        );
        assert_eq!(
            peek_varint(&[0xff, 0xff, 0xff, 0xff]),
            Err(Malformed::VarintTooLong)
        );
        assert_eq!(peek_varint(&[0xff, 0xff, 0xff]), Ok(VarintPeek::Incomplete));
        assert_eq!(peek_varint(&[]), Ok(VarintPeek::Incomplete));
    }

    #[test]
    fn varint_refuses_non_minimal_encodings() {
        assert_eq!(peek_varint(&[0x80, 0x00]), Err(Malformed::VarintNotMinimal));
        assert_eq!(peek_varint(&[0xff, 0x80, 0x00]), Err(Malformed::VarintNotMinimal));
        assert_eq!(peek_varint(&[0x00]), Ok(VarintPeek::Done(0, 1)));
    }

    /// 3.1.1 §2.2.3 Table 2.4: the bounds of each length, both ways (the integration tests
    /// cannot build a 256 MB packet to see the last one encoded).
    #[test]
    fn remaining_length_table() {
        let table: [(u32, &[u8]); 8] = [
            (0, &[0x00]),
            (127, &[0x7f]),
            (128, &[0x80, 0x01]),
            (16_383, &[0xff, 0x7f]),
            (16_384, &[0x80, 0x80, 0x01]),
            (2_097_151, &[0xff, 0xff, 0x7f]),
            (2_097_152, &[0x80, 0x80, 0x80, 0x01]),
            (268_435_455, &[0xff, 0xff, 0xff, 0x7f]),
        ];
        for (value, encoded) in table {
            let mut out = BytesMut::new();
            put_varint(&mut out, value);
            assert_eq!(&out[..], encoded, "{value}");
            assert_eq!(peek_varint(encoded), Ok(VarintPeek::Done(value, encoded.len())));
        }
    }

    #[test]
    fn varint_len_matches_put_varint() {
        for v in [0, 1, 127, 128, 16_383, 16_384, 2_097_151, 2_097_152, VARINT_MAX] {
            let mut out = BytesMut::new();
            put_varint(&mut out, v);
            assert_eq!(out.len(), varint_len(v), "{v}");
            assert_eq!(peek_varint(&out), Ok(VarintPeek::Done(v, out.len())));
        }
    }

    #[test]
    fn string_refuses_null_and_ill_formed_utf8() {
        let mut r = Reader::new(Bytes::from_static(&[0x00, 0x02, b'a', 0x00]));
        assert_eq!(r.string(), Err(Malformed::NullCharacter));
        // An encoded surrogate (U+D800) is not UTF-8.
        let mut r = Reader::new(Bytes::from_static(&[0x00, 0x03, 0xed, 0xa0, 0x80]));
        assert_eq!(r.string(), Err(Malformed::InvalidUtf8));
        let mut r = Reader::new(Bytes::from_static(&[0x00, 0x03, b'a']));
        assert_eq!(r.string(), Err(Malformed::Truncated));
    }

    #[test]
    fn binary_is_split_without_a_copy() {
        let packet = Bytes::from_static(&[0x00, 0x03, 1, 2, 3, 9]);
        let mut r = Reader::new(packet.clone());
        let b = r.binary().unwrap();
        assert_eq!(&b[..], &[1, 2, 3]);
        assert_eq!(b.as_ptr(), packet[2..].as_ptr());
        assert_eq!(r.remaining(), 1);
        assert_eq!(r.finish(), Err(Malformed::TrailingBytes(1)));
    }
}
