//! The peer link's framing: the magic `PHXR` once, then `[u32 big-endian length][payload]`
//! frames. (The HTTP API is served by hyper; see `server::listen`.)

use thiserror::Error;

pub const PEER_MAGIC: &[u8; 4] = b"PHXR";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds frame_bytes_max {max}")]
    TooLarge { len: u64, max: u64 },
}

pub fn encode_frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// Decode one frame from the start of `buf`: `Ok(None)` when more bytes are needed,
/// `Ok(Some((payload, consumed)))` otherwise.
pub fn decode_frame(
    buf: &[u8],
    frame_bytes_max: u64,
) -> Result<Option<(&[u8], usize)>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as u64;
    if len > frame_bytes_max {
        return Err(FrameError::TooLarge {
            len,
            max: frame_bytes_max,
        });
    }
    let end = 4 + len as usize;
    if buf.len() < end {
        return Ok(None);
    }
    Ok(Some((&buf[4..end], end)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn frame_roundtrip() {
        let f = encode_frame(b"hello");
        assert_eq!(decode_frame(&f, 100).unwrap(), Some((&b"hello"[..], 9)));
        assert_eq!(decode_frame(&f[..6], 100).unwrap(), None);
    }

    proptest! {
        #[test]
        fn frame_decoder_never_panics_and_roundtrips(bytes in proptest::collection::vec(any::<u8>(), 0..300), payload in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_frame(&bytes, 128);
            let f = encode_frame(&payload);
            let (p, used) = decode_frame(&f, 1 << 20).unwrap().unwrap();
            prop_assert_eq!(p, &payload[..]);
            prop_assert_eq!(used, f.len());
        }
    }
}
