//! The gRPC codec of every Herald service: prost, except that a message that cannot be decoded
//! is `INVALID_ARGUMENT` (the caller sent bytes that are not the message) instead of tonic-prost's
//! `INTERNAL`, which would tell the caller the server failed. Selected for the generated code by
//! `codec_path` in build.rs.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{Codec, DecodeBuf, Decoder};
use tonic::Status;
use tonic_prost::ProstEncoder;

/// [`tonic_prost::ProstCodec`] with decode errors answered `INVALID_ARGUMENT`.
#[derive(Debug, Clone)]
pub struct HeraldCodec<T, U> {
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for HeraldCodec<T, U> {
    fn default() -> Self {
        HeraldCodec { _pd: PhantomData }
    }
}

impl<T, U> Codec for HeraldCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = HeraldDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        HeraldDecoder { _pd: PhantomData }
    }
}

/// Decodes `U` with prost; bytes that are not a `U` are `INVALID_ARGUMENT`.
#[derive(Debug, Clone)]
pub struct HeraldDecoder<U> {
    _pd: PhantomData<U>,
}

impl<U: Message + Default> Decoder for HeraldDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf)
            .map(Some)
            .map_err(|e| Status::invalid_argument(format!("cannot decode the message: {e}")))
    }
}
