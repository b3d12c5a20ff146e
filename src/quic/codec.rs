//! The QUIC framing, as pure functions over bytes: a frame is a protobuf varint length prefix
//! and that many bytes of one message (protobuf's length-delimited form).
//!
//! No I/O, no clock, no async: short input is "incomplete" (`Ok(None)`), bad input an error,
//! never a panic, so the server, the client, the property tests and the fuzzer
//! (`fuzz/fuzz_targets/quic_codec.rs`) all drive the same code. Part of the wire contract:
//! depends only on prost and the generated messages.
//!
//! Updates and fetch chunks are framed without copying their payload: [`update_frame`] and
//! [`chunk_frame`] build only the few header bytes and hand back the shared `Bytes` to write
//! after them (protobuf decoders accept fields in any order and a nested message is just
//! length-delimited bytes, so header + payload is the same frame prost would encode).

use bytes::{BufMut, Bytes, BytesMut};
use prost::{
    Message,
    encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len},
};

use crate::pb::{EncodedUpdate, WorkerChunk};

/// The largest frame either side accepts (the length prefix excluded).
pub const MAX_FRAME_BYTES: usize = 16 << 20;

/// A varint is at most this long: 64 bits in 7-bit groups.
const MAX_VARINT_BYTES: usize = 10;

/// `QuicResponse.update`.
const RESPONSE_UPDATE_FIELD: u32 = 1;
/// `QuicResponse.chunk`.
const RESPONSE_CHUNK_FIELD: u32 = 4;
/// `WorkerChunk.data`.
const CHUNK_DATA_FIELD: u32 = 4;

/// Why bytes are not a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The length prefix announces more than the limit; known as soon as the prefix is read.
    #[error("frame of {len} bytes is over the limit of {max}")]
    TooLarge {
        /// The announced length.
        len: u64,
        /// The limit.
        max: usize,
    },
    /// The length prefix is longer than 10 bytes or overflows 64 bits.
    #[error("malformed length prefix")]
    BadLength,
    /// The frame's bytes are not the expected message.
    #[error("frame does not decode: {0}")]
    Decode(#[from] prost::DecodeError),
}

/// Decodes the frame at the start of `buf`: the message and how many bytes it used, or
/// `Ok(None)` if `buf` holds only part of it. A length over `max` is an error as soon as the
/// prefix is complete, without waiting for the bytes.
pub fn decode_frame<M: Message + Default>(
    buf: &[u8],
    max: usize,
) -> Result<Option<(M, usize)>, FrameError> {
    let Some((len, prefix)) = decode_length(buf)? else {
        return Ok(None);
    };
    let too_large = || FrameError::TooLarge { len, max };
    let len = usize::try_from(len).map_err(|_| too_large())?;
    if len > max {
        return Err(too_large());
    }
    let end = prefix.checked_add(len).ok_or_else(too_large)?;
    let Some(body) = buf.get(prefix..end) else {
        return Ok(None);
    };
    Ok(Some((M::decode(body)?, end)))
}

/// The varint at the start of `buf` and its length; `Ok(None)` if it is not complete yet.
fn decode_length(buf: &[u8]) -> Result<Option<(u64, usize)>, FrameError> {
    let mut value: u64 = 0;
    for (i, &byte) in buf.iter().take(MAX_VARINT_BYTES).enumerate() {
        let bits = u64::from(byte & 0x7f);
        // The tenth byte holds bit 63 only.
        if i == MAX_VARINT_BYTES - 1 && byte > 1 {
            return Err(FrameError::BadLength);
        }
        value |= bits << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    if buf.len() >= MAX_VARINT_BYTES {
        return Err(FrameError::BadLength);
    }
    Ok(None)
}

/// One frame holding `message`.
pub fn encode_frame<M: Message>(message: &M) -> Bytes {
    Bytes::from(message.encode_length_delimited_to_vec())
}

/// The frame of `QuicResponse { update }` around an update encoded once for all subscribers:
/// the header is written to `headers` (so that a batch shares one allocation) and returned,
/// to be written followed by the update's own bytes.
pub fn update_frame(update: &EncodedUpdate, headers: &mut BytesMut) -> [Bytes; 2] {
    nested_header(RESPONSE_UPDATE_FIELD, update.0.len(), headers);
    [headers.split().freeze(), update.0.clone()]
}

/// The frame of `QuicResponse { chunk }`: a header holding the chunk's small fields, then its
/// data, shared with the bundle rather than copied.
pub fn chunk_frame(chunk: &WorkerChunk, headers: &mut BytesMut) -> [Bytes; 2] {
    let meta = WorkerChunk {
        checksum: chunk.checksum.clone(),
        size: chunk.size,
        offset: chunk.offset,
        data: Bytes::new(),
    };
    let data = &chunk.data;
    let data_field = if data.is_empty() {
        0
    } else {
        key_len(CHUNK_DATA_FIELD) + encoded_len_varint(data.len() as u64) + data.len()
    };
    nested_header(
        RESPONSE_CHUNK_FIELD,
        meta.encoded_len() + data_field,
        headers,
    );
    meta.encode_raw(headers);
    if !data.is_empty() {
        encode_key(CHUNK_DATA_FIELD, WireType::LengthDelimited, headers);
        encode_varint(data.len() as u64, headers);
    }
    [headers.split().freeze(), data.clone()]
}

/// The frame's length prefix and the key and length of one length-delimited field of
/// `inner_len` bytes, which make up the whole message.
fn nested_header(field: u32, inner_len: usize, out: &mut impl BufMut) {
    let inner_len = inner_len as u64;
    let body = key_len(field) as u64 + encoded_len_varint(inner_len) as u64 + inner_len;
    encode_varint(body, out);
    encode_key(field, WireType::LengthDelimited, out);
    encode_varint(inner_len, out);
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::pb::{
        AckRequest, FetchWorkerRequest, ListWorkersRequest, QuicRequest, QuicResponse,
        RegisterRequest, Status, SubscribeRequest, WorkerUpdate, quic_request, quic_response,
    };

    fn varint(value: u64) -> Vec<u8> {
        let mut out = Vec::new();
        encode_varint(value, &mut out);
        out
    }

    #[test]
    fn a_length_prefix_over_the_limit_is_refused_before_its_bytes_arrive() {
        let prefix = varint(1 << 40);
        assert!(matches!(
            decode_frame::<QuicRequest>(&prefix, MAX_FRAME_BYTES),
            Err(FrameError::TooLarge { len, .. }) if len == 1 << 40
        ));
        let prefix = varint(MAX_FRAME_BYTES as u64 + 1);
        assert!(matches!(
            decode_frame::<QuicRequest>(&prefix, MAX_FRAME_BYTES),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn a_length_prefix_at_the_limit_waits_for_its_bytes() {
        let prefix = varint(MAX_FRAME_BYTES as u64);
        assert_eq!(
            decode_frame::<QuicRequest>(&prefix, MAX_FRAME_BYTES),
            Ok(None)
        );
    }

    #[test]
    fn overlong_or_overflowing_varints_are_errors() {
        let eleven = [0x80u8; 11];
        assert_eq!(
            decode_frame::<QuicRequest>(&eleven, MAX_FRAME_BYTES),
            Err(FrameError::BadLength)
        );
        let overflow = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02];
        assert_eq!(
            decode_frame::<QuicRequest>(&overflow, MAX_FRAME_BYTES),
            Err(FrameError::BadLength)
        );
        // u64::MAX is the largest valid prefix: refused for its size, not its form.
        assert!(matches!(
            decode_frame::<QuicRequest>(&varint(u64::MAX), MAX_FRAME_BYTES),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn empty_and_partial_input_is_incomplete() {
        assert_eq!(decode_frame::<QuicRequest>(&[], MAX_FRAME_BYTES), Ok(None));
        assert_eq!(
            decode_frame::<QuicRequest>(&[0x80], MAX_FRAME_BYTES),
            Ok(None)
        );
        assert_eq!(
            decode_frame::<QuicRequest>(&[5, 1, 2], MAX_FRAME_BYTES),
            Ok(None)
        );
    }

    #[test]
    fn bytes_that_are_not_the_message_are_a_decode_error() {
        // Field 1 with wire type 7 (invalid).
        assert!(matches!(
            decode_frame::<QuicRequest>(&[1, 0x0f], MAX_FRAME_BYTES),
            Err(FrameError::Decode(_))
        ));
    }

    #[test]
    fn update_frame_is_the_frame_prost_would_encode() {
        let update = WorkerUpdate {
            kind: 1,
            revision: 7,
            epoch: "e".into(),
            worker_name: "a".into(),
            worker_code: Bytes::from(vec![7u8; 300]),
            ..WorkerUpdate::default()
        };
        let mut headers = BytesMut::new();
        let [header, body] = update_frame(&EncodedUpdate::encode(&update), &mut headers);
        let frame = [header, body].concat();
        let expected = encode_frame(&QuicResponse {
            response: Some(quic_response::Response::Update(update)),
        });
        assert_eq!(frame, expected);
    }

    #[test]
    fn chunk_frames_are_the_frames_prost_would_encode() {
        let chunks = [
            WorkerChunk {
                checksum: "ab".repeat(32),
                size: 70_000,
                offset: 0,
                data: Bytes::from(vec![1u8; 65_536]),
            },
            WorkerChunk {
                offset: 65_536,
                data: Bytes::from(vec![2u8; 4_464]),
                ..WorkerChunk::default()
            },
            WorkerChunk::default(),
        ];
        let mut headers = BytesMut::new();
        for chunk in chunks {
            let [header, data] = chunk_frame(&chunk, &mut headers);
            assert!(header.len() < 100, "the header holds no data");
            let frame = [header, data].concat();
            let expected = encode_frame(&QuicResponse {
                response: Some(quic_response::Response::Chunk(chunk)),
            });
            assert_eq!(frame, expected);
        }
    }

    fn text() -> impl Strategy<Value = String> {
        proptest::string::string_regex("[a-z0-9/é-]{0,12}").unwrap()
    }

    fn request() -> impl Strategy<Value = QuicRequest> {
        use quic_request::Request;
        let subscribe = (
            text(),
            proptest::collection::vec(text(), 0..4),
            any::<u64>(),
            text(),
        )
            .prop_map(|(consumer_id, worker_names, resume_revision, epoch)| {
                Request::Subscribe(SubscribeRequest {
                    consumer_id,
                    worker_names,
                    resume_revision,
                    epoch,
                })
            });
        let register = (
            text(),
            text(),
            proptest::collection::hash_map(text(), text(), 0..3),
        )
            .prop_map(|(consumer_id, endpoint, labels)| {
                Request::Register(RegisterRequest {
                    consumer_id,
                    endpoint,
                    labels,
                })
            });
        let ack = (text(), text(), any::<u64>(), any::<bool>(), text()).prop_map(
            |(consumer_id, worker_name, revision, applied, error)| {
                Request::Ack(AckRequest {
                    consumer_id,
                    worker_name,
                    revision,
                    applied,
                    error,
                })
            },
        );
        let fetch = (text(), text()).prop_map(|(worker_name, version)| {
            Request::Fetch(FetchWorkerRequest {
                worker_name,
                version,
            })
        });
        let list = proptest::collection::vec(text(), 0..4)
            .prop_map(|worker_names| Request::List(ListWorkersRequest { worker_names }));
        proptest::option::weighted(0.95, prop_oneof![subscribe, register, ack, fetch, list])
            .prop_map(|request| QuicRequest { request })
    }

    fn update() -> impl Strategy<Value = WorkerUpdate> {
        (
            0..5i32,
            any::<u64>(),
            text(),
            text(),
            any::<i64>(),
            proptest::collection::vec(any::<u8>(), 0..300),
        )
            .prop_map(
                |(kind, revision, worker_name, version, size, code)| WorkerUpdate {
                    kind,
                    revision,
                    epoch: "epoch".into(),
                    worker_name,
                    version,
                    checksum: "c".repeat(64),
                    size,
                    worker_code: Bytes::from(code),
                    timestamp: size.wrapping_mul(3),
                },
            )
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_and_never_overrun(
            bytes in proptest::collection::vec(any::<u8>(), 0..512),
            max in 0usize..1024,
        ) {
            if let Ok(Some((_, used))) = decode_frame::<QuicRequest>(&bytes, max) {
                prop_assert!(used <= bytes.len());
            }
            if let Ok(Some((_, used))) = decode_frame::<QuicResponse>(&bytes, max) {
                prop_assert!(used <= bytes.len());
            }
        }

        #[test]
        fn requests_round_trip_and_every_prefix_is_incomplete(
            request in request(),
            trailing in proptest::collection::vec(any::<u8>(), 0..8),
        ) {
            let frame = encode_frame(&request);
            let mut buf = frame.to_vec();
            buf.extend_from_slice(&trailing);
            let decoded = decode_frame::<QuicRequest>(&buf, MAX_FRAME_BYTES).unwrap();
            prop_assert_eq!(decoded, Some((request, frame.len())));
            for end in 0..frame.len() {
                prop_assert_eq!(
                    decode_frame::<QuicRequest>(&frame[..end], MAX_FRAME_BYTES),
                    Ok(None)
                );
            }
        }

        #[test]
        fn shared_update_frames_round_trip(updates in proptest::collection::vec(update(), 1..5)) {
            let mut headers = BytesMut::new();
            let mut stream = Vec::new();
            for update in &updates {
                for part in update_frame(&EncodedUpdate::encode(update), &mut headers) {
                    stream.extend_from_slice(&part);
                }
            }
            let mut at = 0;
            for update in updates {
                let (response, used) =
                    decode_frame::<QuicResponse>(&stream[at..], MAX_FRAME_BYTES).unwrap().unwrap();
                prop_assert_eq!(response.response, Some(quic_response::Response::Update(update)));
                at += used;
            }
            prop_assert_eq!(at, stream.len());
        }

        #[test]
        fn status_frames_round_trip(code in any::<i32>(), message in text()) {
            let response = QuicResponse {
                response: Some(quic_response::Response::Error(Status { code, message })),
            };
            let frame = encode_frame(&response);
            prop_assert_eq!(
                decode_frame::<QuicResponse>(&frame, MAX_FRAME_BYTES).unwrap(),
                Some((response, frame.len()))
            );
        }
    }
}
