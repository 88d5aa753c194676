use phalanx_collective::frame::{self, FrameError, Hello, Tag};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200), max in 0usize..300) {
        if let Ok((h, p, n)) = frame::decode_frame(&bytes, max) {
            prop_assert!(n <= bytes.len());
            prop_assert_eq!(p.len(), h.payload_bytes as usize);
            prop_assert!(p.len() <= max);
        }
        let _ = Hello::decode(&bytes);
    }

    #[test]
    fn mutated_valid_frames_never_panic(payload in proptest::collection::vec(any::<u8>(), 0..64),
                                        pos in 0usize..100, val in any::<u8>(), cut in 0usize..100) {
        let mut f = frame::encode_frame(Tag::Data, 5, &payload).unwrap();
        let p = pos % f.len();
        f[p] = val;
        let cut = cut.min(f.len());
        let r = frame::decode_frame(&f[..cut], 64);
        if cut < frame::HEADER_BYTES {
            prop_assert!(matches!(r, Err(FrameError::Truncated { .. })), "expected Truncated for a {}-byte prefix", cut);
        }
        if let Ok((h, _, _)) = r {
            let _ = frame::check_header(&h, Tag::Data, 5, Some(payload.len()));
        }
    }
}
