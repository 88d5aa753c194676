//! Wire frames: pure encode/decode, no I/O.
//!
//! Layout (little-endian), header of [`HEADER_BYTES`] = 20 bytes:
//!
//! | bytes | field                                  |
//! |-------|----------------------------------------|
//! | 0..4  | magic `b"PHX1"`                        |
//! | 4     | tag (1 hello, 2 data, 3 confirm, 4 challenge) |
//! | 5..8  | reserved, must be zero                 |
//! | 8..16 | sequence number (per direction of link)|
//! | 16..20| payload length in bytes                |
//!
//! followed by the payload. A payload longer than `frame_bytes_max` is
//! rejected from the header alone, before anything is allocated.

/// The 4 magic bytes that start every frame.
pub const MAGIC: [u8; 4] = *b"PHX1";
/// Size of the fixed frame header.
pub const HEADER_BYTES: usize = 20;
/// Size of the hello (handshake) payload: group id, rank, world, nonce, MAC.
pub const HELLO_BYTES: usize = 16 + crate::auth::NONCE_BYTES + crate::auth::MAC_BYTES;
/// Size of the challenge payload: the listener's nonce.
pub const CHALLENGE_BYTES: usize = crate::auth::NONCE_BYTES;

/// Frame kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Tag {
    /// Rendezvous handshake carrying [`Hello`].
    Hello = 1,
    /// Operation payload.
    Data = 2,
    /// The connecting side's confirmation that it accepted the listener's [`Hello`]: the
    /// third leg of the rendezvous handshake. A listener takes a connection only once it has
    /// this, so a connection whose dialer gave up (and closed it) is never mistaken for a
    /// live link.
    Confirm = 3,
    /// The listener's fresh nonce, sent first on every accepted connection: the dialer's
    /// hello must prove the epoch secret over it (see [`crate::auth`]).
    Challenge = 4,
}

impl Tag {
    fn from_u8(b: u8) -> Option<Tag> {
        match b {
            1 => Some(Tag::Hello),
            2 => Some(Tag::Data),
            3 => Some(Tag::Confirm),
            4 => Some(Tag::Challenge),
            _ => None,
        }
    }
}

/// Malformed-frame errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("bad magic {found:02x?}, expected {MAGIC:02x?}")]
    BadMagic { found: [u8; 4] },
    #[error("unknown frame tag {tag}")]
    UnknownTag { tag: u8 },
    #[error("reserved header bytes are not zero: {found:02x?}")]
    ReservedNonZero { found: [u8; 3] },
    #[error("payload of {payload_bytes} bytes exceeds frame_bytes_max {frame_bytes_max}")]
    TooLarge {
        payload_bytes: u64,
        frame_bytes_max: usize,
    },
    #[error("truncated frame: need {needed} bytes, have {available}")]
    Truncated { needed: usize, available: usize },
    #[error("sequence mismatch: expected {expected}, found {found}")]
    SequenceMismatch { expected: u64, found: u64 },
    #[error("unexpected frame tag {found:?}, expected {expected:?}")]
    UnexpectedTag { expected: Tag, found: Tag },
    #[error("wrong payload size: expected {expected} bytes, found {found}")]
    PayloadSize { expected: usize, found: usize },
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub tag: Tag,
    pub seq: u64,
    pub payload_bytes: u32,
}

/// Encode a header.
pub fn encode_header(h: &FrameHeader) -> [u8; HEADER_BYTES] {
    let mut out = [0u8; HEADER_BYTES];
    out[0..4].copy_from_slice(&MAGIC);
    out[4] = h.tag as u8;
    out[8..16].copy_from_slice(&h.seq.to_le_bytes());
    out[16..20].copy_from_slice(&h.payload_bytes.to_le_bytes());
    out
}

/// Decode and validate a header from the first [`HEADER_BYTES`] of `bytes`.
pub fn decode_header(bytes: &[u8], frame_bytes_max: usize) -> Result<FrameHeader, FrameError> {
    let Some(h) = bytes.get(..HEADER_BYTES) else {
        return Err(FrameError::Truncated {
            needed: HEADER_BYTES,
            available: bytes.len(),
        });
    };
    let mut magic = [0u8; 4];
    magic.copy_from_slice(&h[0..4]);
    if magic != MAGIC {
        return Err(FrameError::BadMagic { found: magic });
    }
    let tag = Tag::from_u8(h[4]).ok_or(FrameError::UnknownTag { tag: h[4] })?;
    if h[5..8] != [0, 0, 0] {
        return Err(FrameError::ReservedNonZero {
            found: [h[5], h[6], h[7]],
        });
    }
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&h[8..16]);
    let mut len = [0u8; 4];
    len.copy_from_slice(&h[16..20]);
    let payload_bytes = u32::from_le_bytes(len);
    if payload_bytes as u64 > frame_bytes_max as u64 {
        return Err(FrameError::TooLarge {
            payload_bytes: payload_bytes as u64,
            frame_bytes_max,
        });
    }
    Ok(FrameHeader {
        tag,
        seq: u64::from_le_bytes(seq),
        payload_bytes,
    })
}

/// Encode a whole frame (header + payload).
pub fn encode_frame(tag: Tag, seq: u64, payload: &[u8]) -> Result<Vec<u8>, FrameError> {
    let payload_bytes = u32::try_from(payload.len()).map_err(|_| FrameError::TooLarge {
        payload_bytes: payload.len() as u64,
        frame_bytes_max: u32::MAX as usize,
    })?;
    let mut out = Vec::with_capacity(HEADER_BYTES + payload.len());
    out.extend_from_slice(&encode_header(&FrameHeader {
        tag,
        seq,
        payload_bytes,
    }));
    out.extend_from_slice(payload);
    Ok(out)
}

/// Decode one frame from the front of `buf`. Returns the header, the payload
/// and the number of bytes consumed.
pub fn decode_frame(
    buf: &[u8],
    frame_bytes_max: usize,
) -> Result<(FrameHeader, &[u8], usize), FrameError> {
    let h = decode_header(buf, frame_bytes_max)?;
    let total = HEADER_BYTES + h.payload_bytes as usize;
    match buf.get(HEADER_BYTES..total) {
        Some(p) => Ok((h, p, total)),
        None => Err(FrameError::Truncated {
            needed: total,
            available: buf.len(),
        }),
    }
}

/// Check a received header against what the protocol expects next.
pub fn check_header(
    h: &FrameHeader,
    expected_tag: Tag,
    expected_seq: u64,
    expected_payload_bytes: Option<usize>,
) -> Result<(), FrameError> {
    if h.tag != expected_tag {
        return Err(FrameError::UnexpectedTag {
            expected: expected_tag,
            found: h.tag,
        });
    }
    if h.seq != expected_seq {
        return Err(FrameError::SequenceMismatch {
            expected: expected_seq,
            found: h.seq,
        });
    }
    if let Some(n) = expected_payload_bytes {
        if h.payload_bytes as usize != n {
            return Err(FrameError::PayloadSize {
                expected: n,
                found: h.payload_bytes as usize,
            });
        }
    }
    Ok(())
}

/// Handshake payload (tags `Hello` and `Confirm`). `nonce` is the sender's own nonce
/// (the listener's answer echoes the challenge), `mac` proves the epoch secret over the
/// whole exchange ([`crate::auth::mac`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    pub group_id: u64,
    pub rank: u32,
    pub world: u32,
    pub nonce: [u8; crate::auth::NONCE_BYTES],
    pub mac: [u8; crate::auth::MAC_BYTES],
}

impl Hello {
    pub fn encode(&self) -> [u8; HELLO_BYTES] {
        let mut out = [0u8; HELLO_BYTES];
        out[0..8].copy_from_slice(&self.group_id.to_le_bytes());
        out[8..12].copy_from_slice(&self.rank.to_le_bytes());
        out[12..16].copy_from_slice(&self.world.to_le_bytes());
        out[16..48].copy_from_slice(&self.nonce);
        out[48..80].copy_from_slice(&self.mac);
        out
    }

    pub fn decode(payload: &[u8]) -> Result<Hello, FrameError> {
        if payload.len() != HELLO_BYTES {
            return Err(FrameError::PayloadSize {
                expected: HELLO_BYTES,
                found: payload.len(),
            });
        }
        let mut g = [0u8; 8];
        g.copy_from_slice(&payload[0..8]);
        let mut r = [0u8; 4];
        r.copy_from_slice(&payload[8..12]);
        let mut w = [0u8; 4];
        w.copy_from_slice(&payload[12..16]);
        let mut nonce = [0u8; crate::auth::NONCE_BYTES];
        nonce.copy_from_slice(&payload[16..48]);
        let mut mac = [0u8; crate::auth::MAC_BYTES];
        mac.copy_from_slice(&payload[48..80]);
        Ok(Hello {
            group_id: u64::from_le_bytes(g),
            rank: u32::from_le_bytes(r),
            world: u32::from_le_bytes(w),
            nonce,
            mac,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let f = encode_frame(Tag::Data, 7, b"hello").unwrap();
        let (h, p, n) = decode_frame(&f, 1024).unwrap();
        assert_eq!(h.tag, Tag::Data);
        assert_eq!(h.seq, 7);
        assert_eq!(p, b"hello");
        assert_eq!(n, f.len());
        let hello = Hello {
            group_id: 9,
            rank: 2,
            world: 5,
            nonce: [3; 32],
            mac: [4; 32],
        };
        assert_eq!(Hello::decode(&hello.encode()).unwrap(), hello);
    }

    #[test]
    fn malformed() {
        let f = encode_frame(Tag::Data, 1, &[0u8; 64]).unwrap();
        assert!(matches!(
            decode_frame(&f[..10], 1024),
            Err(FrameError::Truncated { .. })
        ));
        assert!(matches!(
            decode_frame(&f[..30], 1024),
            Err(FrameError::Truncated { .. })
        ));
        assert!(matches!(
            decode_frame(&f, 63),
            Err(FrameError::TooLarge { .. })
        ));
        let mut bad = f.clone();
        bad[0] = b'X';
        assert!(matches!(
            decode_frame(&bad, 1024),
            Err(FrameError::BadMagic { .. })
        ));
        let mut bad = f.clone();
        bad[4] = 99;
        assert!(matches!(
            decode_frame(&bad, 1024),
            Err(FrameError::UnknownTag { tag: 99 })
        ));
        let mut bad = f.clone();
        bad[6] = 1;
        assert!(matches!(
            decode_frame(&bad, 1024),
            Err(FrameError::ReservedNonZero { .. })
        ));
        let (h, _, _) = decode_frame(&f, 1024).unwrap();
        assert!(matches!(
            check_header(&h, Tag::Data, 2, None),
            Err(FrameError::SequenceMismatch { .. })
        ));
        assert!(matches!(
            check_header(&h, Tag::Hello, 1, None),
            Err(FrameError::UnexpectedTag { .. })
        ));
        assert!(matches!(
            check_header(&h, Tag::Data, 1, Some(8)),
            Err(FrameError::PayloadSize { .. })
        ));
        assert!(check_header(&h, Tag::Data, 1, Some(64)).is_ok());
        assert!(Hello::decode(&[0u8; 3]).is_err());
    }
}
