//! Fuzzes the QUIC framing: arbitrary bytes never panic the decoder, a decoded frame never
//! claims more bytes than it was given, and whatever decodes re-encodes to a frame that decodes
//! to the same message. `cargo fuzz run quic_codec` (nightly); CI runs the proptest instead.
#![no_main]

use libfuzzer_sys::fuzz_target;
use workerpush::{
    pb::{QuicRequest, QuicResponse},
    quic::codec::{MAX_FRAME_BYTES, decode_frame, encode_frame},
};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((request, used))) = decode_frame::<QuicRequest>(data, MAX_FRAME_BYTES) {
        assert!(used <= data.len());
        let frame = encode_frame(&request);
        let again = decode_frame::<QuicRequest>(&frame, MAX_FRAME_BYTES);
        assert_eq!(again, Ok(Some((request, frame.len()))));
    }
    if let Ok(Some((response, used))) = decode_frame::<QuicResponse>(data, 1 << 10) {
        assert!(used <= data.len());
        let frame = encode_frame(&response);
        let again = decode_frame::<QuicResponse>(&frame, MAX_FRAME_BYTES);
        assert_eq!(again, Ok(Some((response, frame.len()))));
    }
});
