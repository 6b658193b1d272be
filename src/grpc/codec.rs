//! The protobuf codec of every fleetcare service: tonic-prost's, except that a
//! body that is not valid protobuf is the caller's fault, INVALID_ARGUMENT
//! naming the problem, where tonic-prost answers INTERNAL (`build.rs` selects
//! this codec with `codec_path`).

use std::marker::PhantomData;
use std::pin::Pin;

use futures::Stream;
use prost::Message;
use prost::bytes::{BufMut, Bytes};
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

use crate::domain::transition::Transition;
use crate::proto::v1 as pb;

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

/// One message of a `WatchTransitions` stream: built for this watcher, or
/// encoded once and shared by every watcher (a transition is the same message
/// on every stream; see [`WireCache`]).
#[derive(Debug, Clone)]
pub enum WatchFrame {
    /// Boxed: a snapshot's `Agent` makes it far larger than a shared frame.
    Message(Box<pb::WatchTransitionsResponse>),
    /// A `WatchTransitionsResponse`, protobuf-encoded.
    Encoded(Bytes),
}

/// A watch stream of frames: what `AgentStatusApi::watch_frames` returns and
/// the watch route (`grpc::watch_route`) serves.
pub type FrameStream = Pin<Box<dyn Stream<Item = Result<WatchFrame, Status>> + Send>>;

/// The codec of the watch route (`grpc::watch_route`): frames out, requests in
/// as [`ProstCodec`] decodes them.
#[derive(Debug, Clone, Copy)]
pub struct FrameCodec<U> {
    _pd: PhantomData<U>,
}

impl<U> Default for FrameCodec<U> {
    fn default() -> Self {
        FrameCodec { _pd: PhantomData }
    }
}

impl<U: Message + Default + Send + 'static> Codec for FrameCodec<U> {
    type Encode = WatchFrame;
    type Decode = U;
    type Encoder = FrameEncoder;
    type Decoder = InvalidArgumentDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        FrameEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        InvalidArgumentDecoder {
            inner: tonic_prost::ProstDecoder::new(BufferSettings::default()),
        }
    }
}

/// Encodes a built frame as prost does, and copies an encoded one as it is.
#[derive(Debug, Clone, Copy)]
pub struct FrameEncoder;

impl Encoder for FrameEncoder {
    type Item = WatchFrame;
    type Error = Status;

    fn encode(&mut self, item: WatchFrame, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        match item {
            WatchFrame::Message(message) => message
                .encode(buf)
                .map_err(|e| Status::internal(format!("cannot encode a watch message: {e}"))),
            WatchFrame::Encoded(bytes) => {
                buf.put_slice(&bytes);
                Ok(())
            }
        }
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

/// Transitions encoded once per server for all of its watchers, by revision:
/// the last [`WIRE_SLOTS`] revisions, in a ring (a watcher catching up from
/// further back encodes for itself, and leaves the encoding for the next).
pub struct WireCache {
    slots: Vec<std::sync::Mutex<Option<(i64, Bytes)>>>,
}

/// How many encoded transitions a server keeps.
pub const WIRE_SLOTS: usize = 4096;

impl Default for WireCache {
    fn default() -> Self {
        WireCache {
            slots: (0..WIRE_SLOTS).map(|_| Default::default()).collect(),
        }
    }
}

impl WireCache {
    /// The `WatchTransitionsResponse` carrying `transition`, encoded.
    pub fn transition(&self, transition: &Transition) -> Bytes {
        let revision = transition.revision;
        let slot = &self.slots[revision.rem_euclid(WIRE_SLOTS as i64) as usize];
        if let Some((r, bytes)) = &*slot.lock().unwrap_or_else(|e| e.into_inner())
            && *r == revision
        {
            return bytes.clone();
        }
        let message = pb::WatchTransitionsResponse {
            event: Some(pb::watch_transitions_response::Event::Transition(
                transition.into(),
            )),
        };
        let bytes = Bytes::from(message.encode_to_vec());
        *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some((revision, bytes.clone()));
        bytes
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
    fn a_shared_transition_frame_is_the_message_prost_encodes() {
        use chrono::TimeZone;
        let at = chrono::Utc.with_ymd_and_hms(2026, 5, 1, 0, 0, 0).unwrap();
        let transition = Transition {
            revision: 7,
            agent_id: "a".into(),
            from: Some(crate::domain::agent::AgentStatus::Idle),
            to: crate::domain::agent::AgentStatus::Busy,
            cause: crate::domain::agent::Cause::WorkStarted,
            occurred_at: at,
            exhaustion_reason: None,
            recovery_at: None,
            actor: "test".into(),
            quota_pool: None,
        };
        let cache = WireCache::default();
        let first = cache.transition(&transition);
        let expected = pb::WatchTransitionsResponse {
            event: Some(pb::watch_transitions_response::Event::Transition(
                (&transition).into(),
            )),
        };
        assert_eq!(&first[..], &expected.encode_to_vec()[..]);
        let again = cache.transition(&transition);
        assert_eq!(first.as_ptr(), again.as_ptr(), "encoded twice");
        // Another revision in the same slot replaces it.
        let later = Transition {
            revision: 7 + WIRE_SLOTS as i64,
            ..transition
        };
        let decoded = pb::WatchTransitionsResponse::decode(&cache.transition(&later)[..]).unwrap();
        match decoded.event {
            Some(pb::watch_transitions_response::Event::Transition(t)) => {
                assert_eq!(t.revision, later.revision)
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_decode_failure_names_the_problem() {
        let text = malformed("failed to decode Protobuf message: invalid wire type");
        assert!(text.starts_with("message is not valid protobuf"), "{text}");
    }
}
