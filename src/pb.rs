//! The wire contract, generated from `proto/control_plane.proto`, plus [`EncodedUpdate`]: a
//! `WorkerUpdate` encoded once and shared by every subscriber, on gRPC and QUIC alike.
//!
//! Depends on nothing of ours; everything else may depend on it.

#![allow(missing_docs, clippy::all, clippy::pedantic)]

use std::marker::PhantomData;

use bytes::{Buf, BufMut, Bytes};
use prost::encoding::{DecodeContext, WireType};
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

tonic::include_proto!("controlplane.v1");

/// The gRPC server, generated with [`EncodedUpdate`] as the item of `SubscribeWorkerUpdates`.
pub mod server {
    include!(concat!(env!("OUT_DIR"), "/controlplane.v1.ControlPlane.rs"));
}

/// Most acks one `AckBatch` may carry (the core refuses larger batches with
/// RESOURCE_EXHAUSTED; the client library never sends one).
pub const MAX_ACKS_PER_BATCH: usize = 1024;

/// The file descriptor set of the contract, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/control_plane_descriptor.bin"));

/// A `WorkerUpdate` already encoded as protobuf bytes (without a length prefix).
///
/// Cloning is a reference-count increment: one encoding serves every subscriber. It is an
/// output-only message; decoding one yields nothing (clients decode [`WorkerUpdate`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EncodedUpdate(pub Bytes);

impl EncodedUpdate {
    /// Encodes `update` once.
    pub fn encode(update: &WorkerUpdate) -> Self {
        Self(Bytes::from(prost::Message::encode_to_vec(update)))
    }

    /// Decodes the shared bytes back into a message (tests and diagnostics).
    pub fn decode(&self) -> Result<WorkerUpdate, prost::DecodeError> {
        <WorkerUpdate as prost::Message>::decode(self.0.clone())
    }
}

impl prost::Message for EncodedUpdate {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        buf.put_slice(&self.0);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        self.0.len()
    }

    fn clear(&mut self) {
        self.0 = Bytes::new();
    }
}

/// The codec of `SubscribeWorkerUpdates`: prost's, with a 1 KiB encode buffer instead of 8 KiB.
/// Every live subscription holds one for its whole life and each update is written out as it
/// comes, so most of the default would be memory held by idle subscribers; a larger update or
/// batch grows the buffer as it needs.
pub struct UpdateCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for UpdateCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for UpdateCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        // Yielding to the body at 32 KiB, as tonic does by default.
        ProstCodec::<T, U>::raw_encoder(BufferSettings::new(1024, 32 * 1024))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(BufferSettings::default())
    }
}
