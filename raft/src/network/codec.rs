//! bincode inside protobuf: how openraft's messages and Herald's ops travel in the raft service's
//! `bytes` fields.
//!
//! The encoding is bincode 1.3's classic layout (fixed-width little-endian integers, the layout
//! `bincode::serialize` writes). Decoding is stricter than `bincode::deserialize`: trailing bytes
//! are an error and a declared length past [`MAX_DECODE_BYTES`] is refused before anything is
//! allocated, so a corrupt or hostile payload yields a [`CodecError`], never a panic or a huge
//! allocation.

use bincode::Options;
use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::WriteError;

/// Largest value a payload may decode to. Equal to the largest gRPC message the transport accepts:
/// a payload can never legitimately describe more than it carries.
pub const MAX_DECODE_BYTES: u64 = super::MAX_MESSAGE_BYTES as u64;

/// A value could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("cannot encode {what}: {source}")]
    Encode {
        what: &'static str,
        #[source]
        source: bincode::Error,
    },
    #[error("cannot decode {what} ({len} bytes): {source}")]
    Decode {
        what: &'static str,
        len: usize,
        #[source]
        source: bincode::Error,
    },
}

fn options() -> impl Options {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_little_endian()
        .reject_trailing_bytes()
        .with_limit(MAX_DECODE_BYTES)
}

/// Encodes `value`; `what` names it in the error.
pub fn encode<T: Serialize + ?Sized>(what: &'static str, value: &T) -> Result<Bytes, CodecError> {
    options()
        .serialize(value)
        .map(Bytes::from)
        .map_err(|source| CodecError::Encode { what, source })
}

/// Decodes a `T` from exactly `bytes`; `what` names it in the error.
pub fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, CodecError> {
    options().deserialize(bytes).map_err(|source| CodecError::Decode {
        what,
        len: bytes.len(),
        source,
    })
}

/// Prefix of `ForwardReply.error` when the leader refused the batch as malformed: nothing was
/// proposed. Any other text means the outcome is unknown.
const INVALID_PREFIX: &str = "invalid: ";

/// `ForwardReply.error` for a write error other than "not the leader" (which travels as
/// `NotLeader`).
pub fn forward_error_to_text(e: &WriteError) -> String {
    match e {
        WriteError::Invalid(msg) => format!("{INVALID_PREFIX}{msg}"),
        WriteError::Indeterminate(msg) => format!("indeterminate: {msg}"),
        WriteError::Shutdown => "shutdown: the leader is shutting down".to_string(),
        WriteError::Unavailable { .. } => format!("unavailable: {e}"),
    }
}

/// The caller's view of a `ForwardReply.error`. Only a refusal as malformed is known not to have
/// been proposed; everything else (including a leader shutting down mid-write) may still commit,
/// so it is `Indeterminate`.
pub fn forward_error_from_text(text: &str) -> WriteError {
    match text.strip_prefix(INVALID_PREFIX) {
        Some(msg) => WriteError::Invalid(msg.to_string()),
        None => WriteError::Indeterminate(format!("leader: {text}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{Op, OpResult, Rejection};

    #[test]
    fn same_bytes_as_bincode_serialize() {
        let ops = vec![Op::NodeDown { node: 7 }, Op::Expire { max: 3 }];
        let ours = encode("ops", &ops).unwrap();
        assert_eq!(&ours[..], &bincode::serialize(&ops).unwrap()[..]);
        let back: Vec<Op> = decode("ops", &ours).unwrap();
        assert_eq!(back, ops);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bytes in [
            &b""[..],
            &b"\xff\xff\xff\xff\xff\xff\xff\xff"[..],
            &[1, 0, 0, 0, 0, 0, 0, 0, 9][..],
        ] {
            assert!(decode::<Vec<OpResult>>("results", bytes).is_err());
        }
        // A length prefix far past the limit is refused without allocating.
        let mut huge = u64::MAX.to_le_bytes().to_vec();
        huge.extend_from_slice(&[0; 16]);
        assert!(decode::<Vec<u8>>("blob", &huge).is_err());
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut bytes = encode("r", &vec![OpResult::Rejected(Rejection::Invalid("x".into()))])
            .unwrap()
            .to_vec();
        bytes.push(0);
        assert!(decode::<Vec<OpResult>>("r", &bytes).is_err());
    }
}
