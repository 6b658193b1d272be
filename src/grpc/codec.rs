//! The protobuf codec of every fleetcare service: tonic-prost's, except that a
//! body that is not valid protobuf is the caller's fault, INVALID_ARGUMENT
//! naming the problem, where tonic-prost answers INTERNAL (`build.rs` selects
//! this codec with `codec_path`).

use std::marker::PhantomData;

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};

/// [`tonic_prost::ProstCodec`] with [`InvalidArgumentDecoder`].
#[derive(Debug, Clone, Copy)]
pub struct ProstCodec<T, U> {
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for ProstCodec<T, U> {
    fn default() -> Self {
        ProstCodec { _pd: PhantomData }
    }
}

impl<T, U> Codec for ProstCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = tonic_prost::ProstEncoder<T>;
    type Decoder = InvalidArgumentDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstEncoder::new(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        InvalidArgumentDecoder {
            inner: tonic_prost::ProstDecoder::new(BufferSettings::default()),
        }
    }
}

/// Decodes like tonic-prost, answering a decode error INVALID_ARGUMENT.
#[derive(Debug, Clone)]
pub struct InvalidArgumentDecoder<U> {
    inner: tonic_prost::ProstDecoder<U>,
}

impl<U: Message + Default> Decoder for InvalidArgumentDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.inner
            .decode(buf)
            .map_err(|status| Status::invalid_argument(malformed(status.message())))
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.inner.buffer_settings()
    }
}

/// The message of a decode failure (prost's text names the field and wire problem).
fn malformed(detail: &str) -> String {
    format!("message is not valid protobuf: {detail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_decode_failure_names_the_problem() {
        let text = malformed("failed to decode Protobuf message: invalid wire type");
        assert!(text.starts_with("message is not valid protobuf"), "{text}");
    }
}
