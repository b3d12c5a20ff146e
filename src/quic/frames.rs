//! Frames on quinn streams: whole frames read off a `RecvStream` with the pure [`codec`], for
//! the server (one request per stream) and the client (the answers).
//!
//! [`codec`]: super::codec

use bytes::{Buf, BytesMut};
use prost::Message;

use super::codec::{FrameError, decode_frame};

/// Most bytes taken from quinn per read; a frame may span many reads.
const READ_BYTES: usize = 64 * 1024;

/// Why no frame could be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadFrameError {
    /// The bytes are not a frame (too large, malformed, not the expected message).
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The peer finished the stream in the middle of a frame.
    #[error("stream finished {0} bytes into an incomplete frame")]
    Truncated(usize),
    /// The stream was reset or the connection lost.
    #[error("stream: {0}")]
    Read(#[from] quinn::ReadError),
}

/// Reads frames off one stream, holding at most one frame (bounded by `max`) plus one read.
#[derive(Debug)]
pub struct FrameReader {
    recv: quinn::RecvStream,
    buf: BytesMut,
    max: usize,
}

impl FrameReader {
    /// Frames of at most `max` bytes from `recv`.
    pub fn new(recv: quinn::RecvStream, max: usize) -> Self {
        Self {
            recv,
            buf: BytesMut::new(),
            max,
        }
    }

    /// The next frame, or `Ok(None)` when the peer finished the stream between frames. An
    /// oversized length prefix is an error as soon as it is read.
    pub async fn next<M: Message + Default>(&mut self) -> Result<Option<M>, ReadFrameError> {
        loop {
            if let Some((message, used)) = decode_frame::<M>(&self.buf, self.max)? {
                self.buf.advance(used);
                return Ok(Some(message));
            }
            match self.recv.read_chunk(READ_BYTES, true).await? {
                Some(chunk) => self.buf.extend_from_slice(&chunk.bytes),
                None if self.buf.is_empty() => return Ok(None),
                None => return Err(ReadFrameError::Truncated(self.buf.len())),
            }
        }
    }
}
