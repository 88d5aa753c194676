//! Random bytes as a shard header, shard file or manifest give errors, never panics.

use std::fs;

use phalanx_checkpoint::*;
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_header_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = ShardHeader::decode(&bytes);
    }

    #[test]
    fn valid_magic_random_rest_never_panics(mut bytes in proptest::collection::vec(any::<u8>(), 128..200), fix_crc: bool) {
        bytes[0..8].copy_from_slice(&MAGIC);
        bytes[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        bytes[12..16].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        if fix_crc {
            let crc = crc32(&bytes[0..124]);
            bytes[124..128].copy_from_slice(&crc.to_le_bytes());
        }
        if let Ok(h) = ShardHeader::decode(&bytes) {
            prop_assert!(h.rank < h.world);
            prop_assert!(h.range_end <= h.param_count);
        }
    }

    #[test]
    fn random_manifest_and_shard_give_errors(manifest in proptest::collection::vec(any::<u8>(), 0..400),
                                             shard in proptest::collection::vec(any::<u8>(), 0..400)) {
        let dir = tempfile::tempdir().unwrap();
        let sdir = step_dir(dir.path(), 3);
        fs::create_dir_all(&sdir).unwrap();
        fs::write(sdir.join(MANIFEST_FILE), &manifest).unwrap();
        fs::write(sdir.join("shard-0-of-1.bin"), &shard).unwrap();
        prop_assert!(!verify(dir.path(), 3).is_valid());
        prop_assert!(load_resharded(dir.path(), 3, 1, 0).is_err());
        prop_assert_eq!(latest_valid(dir.path()).unwrap().step(), None);
    }

    #[test]
    fn plausible_manifest_with_random_shard_gives_errors(shard in proptest::collection::vec(any::<u8>(), 0..400), len in 0usize..50) {
        let dir = tempfile::tempdir().unwrap();
        let sdir = step_dir(dir.path(), 3);
        fs::create_dir_all(&sdir).unwrap();
        fs::write(sdir.join("shard-0-of-1.bin"), &shard).unwrap();
        let sha = params_sha256(&[]); // any 64-hex string
        let m = Manifest {
            format_version: FORMAT_VERSION, job: String::new(), model: String::new(), numerics: String::new(), step: 3, world: 1, param_count: len, seed: 0, layout: vec![],
            params_sha256: None,
            shards: vec![ShardRecord { file: shard_file_name(0, 1), rank: 0, world: 1, step: 3, range: 0..len,
                bytes: shard.len() as u64, sha256: sha.clone(), params_section_sha256: sha }],
        };
        fs::write(sdir.join(MANIFEST_FILE), serde_json::to_vec(&m).unwrap()).unwrap();
        prop_assert!(!verify(dir.path(), 3).is_valid());
        prop_assert!(load_resharded(dir.path(), 3, 1, 0).is_err());
    }
}
