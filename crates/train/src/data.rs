//! Byte-level tokens, corpus loading and the train/validation split.
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::TrainError;

/// Byte-level tokenizer: token = byte value, vocabulary 256. Lossless for any input.
pub mod tokenizer {
    pub fn encode(text: &str) -> Vec<i64> {
        text.as_bytes().iter().map(|&b| i64::from(b)).collect()
    }

    /// Tokens outside 0..=255 are an error; invalid UTF-8 is replaced (lossy) for display.
    pub fn decode(tokens: &[i64]) -> Result<String, i64> {
        let bytes = tokens
            .iter()
            .map(|&t| u8::try_from(t).map_err(|_| t))
            .collect::<Result<Vec<u8>, i64>>()?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
}

/// Where the default corpus lives: the C++ headers of the pinned libtorch (2.11.0), which
/// `just setup` brings onto every machine. Real text that nobody on this project wrote,
/// present offline, and pinned by the wheel's version (its hash is checked by pip).
pub fn default_corpus_spec() -> String {
    let libtorch = option_env!("PHALANX_LIBTORCH_DIR").unwrap_or(".libtorch");
    format!("{libtorch}/include/torch/csrc/api/include/torch/**/*.h")
}

/// A loaded corpus: bytes of every file, concatenated in sorted path order.
#[derive(Debug)]
pub struct Corpus {
    pub bytes: Vec<u8>,
    pub files: Vec<PathBuf>,
    /// SHA-256 of `bytes`, recorded in summaries so a run names its exact data.
    pub sha256: String,
    pub spec: String,
}

/// The most files a corpus may have: a job naming `/` or `/proc` by mistake is refused,
/// not walked for hours.
pub const CORPUS_FILES_MAX: usize = 100_000;
/// The most bytes a corpus may hold (every worker keeps it in memory).
pub const CORPUS_BYTES_MAX: u64 = 8 << 30;

impl Corpus {
    /// `spec` is a file, a directory (every regular file below it; symbolic links to
    /// directories are not followed, so a link cycle ends) or a glob pattern. At most
    /// [`CORPUS_FILES_MAX`] files and [`CORPUS_BYTES_MAX`] bytes.
    pub fn load(spec: &str) -> Result<Self, TrainError> {
        let files = resolve(spec)?;
        let mut bytes = Vec::new();
        for f in &files {
            let b = std::fs::read(f).map_err(|e| {
                TrainError::Corpus(format!("cannot read corpus file {}: {e}", f.display()))
            })?;
            bytes.extend_from_slice(&b);
            if bytes.len() as u64 > CORPUS_BYTES_MAX {
                return Err(TrainError::Corpus(format!(
                    "corpus `{spec}` holds more than {CORPUS_BYTES_MAX} bytes (at {})",
                    f.display()
                )));
            }
        }
        if bytes.is_empty() {
            return Err(TrainError::Corpus(format!(
                "corpus `{spec}` is empty ({} file(s), 0 bytes)",
                files.len()
            )));
        }
        let sha256 = hex::encode(Sha256::digest(&bytes));
        Ok(Self {
            bytes,
            files,
            sha256,
            spec: spec.to_string(),
        })
    }

    /// Splits into train and validation: the last `val_fraction` of the bytes validate.
    /// Both parts must hold at least one full sequence (`ctx_len + 1` tokens).
    pub fn split(&self, val_fraction: f64, ctx_len: i64) -> Result<(Vec<u8>, Vec<u8>), TrainError> {
        if !(0.0..1.0).contains(&val_fraction) {
            return Err(TrainError::Config(format!(
                "val_fraction {val_fraction} must be in [0, 1)"
            )));
        }
        let need = (ctx_len + 1) as usize;
        let n_val = ((self.bytes.len() as f64) * val_fraction).round() as usize;
        let n_train = self.bytes.len() - n_val;
        if n_train < need || (val_fraction > 0.0 && n_val < need) {
            return Err(TrainError::Corpus(format!(
                "corpus `{}` has {} bytes: too small for context {} with a {:.0}% validation split \
                 (each part needs at least {} bytes)",
                self.spec,
                self.bytes.len(),
                ctx_len,
                val_fraction * 100.0,
                need
            )));
        }
        Ok((
            self.bytes[..n_train].to_vec(),
            self.bytes[n_train..].to_vec(),
        ))
    }
}

fn resolve(spec: &str) -> Result<Vec<PathBuf>, TrainError> {
    let path = Path::new(spec);
    let mut files = Vec::new();
    if path.is_file() {
        files.push(path.to_path_buf());
    } else if path.is_dir() {
        walk(path, &mut files)?;
    } else if spec.contains(['*', '?', '[']) {
        let paths = glob::glob(spec)
            .map_err(|e| TrainError::Corpus(format!("bad corpus glob `{spec}`: {e}")))?;
        for p in paths {
            let p = p.map_err(|e| TrainError::Corpus(format!("corpus glob `{spec}`: {e}")))?;
            if p.is_file() {
                files.push(p);
            }
            if files.len() > CORPUS_FILES_MAX {
                return Err(TrainError::Corpus(format!(
                    "corpus glob `{spec}` matches more than {CORPUS_FILES_MAX} files"
                )));
            }
        }
    } else {
        return Err(TrainError::Corpus(format!(
            "corpus `{spec}` does not exist (expected a file, a directory or a glob)"
        )));
    }
    files.sort();
    if files.is_empty() {
        return Err(TrainError::Corpus(format!(
            "corpus `{spec}` matches no files"
        )));
    }
    Ok(files)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), TrainError> {
    let rd = std::fs::read_dir(dir)
        .map_err(|e| TrainError::Corpus(format!("cannot list {}: {e}", dir.display())))?;
    for entry in rd {
        let entry =
            entry.map_err(|e| TrainError::Corpus(format!("cannot list {}: {e}", dir.display())))?;
        let p = entry.path();
        let kind = entry
            .file_type()
            .map_err(|e| TrainError::Corpus(format!("cannot stat {}: {e}", p.display())))?;
        // A real directory is walked; a link is taken only when it leads to a file.
        if kind.is_dir() {
            walk(&p, out)?;
        } else if p.is_file() {
            out.push(p);
        }
        if out.len() > CORPUS_FILES_MAX {
            return Err(TrainError::Corpus(format!(
                "corpus directory holds more than {CORPUS_FILES_MAX} files (in {})",
                dir.display()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A link back up the tree is not followed (the walk ends); a link to a file is read.
    #[test]
    fn a_link_cycle_in_a_corpus_directory_ends_the_walk() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("c");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/a.txt"), "alpha ").unwrap();
        std::fs::write(d.path().join("outside.txt"), "beta").unwrap();
        std::os::unix::fs::symlink(&root, root.join("sub/up")).unwrap();
        std::os::unix::fs::symlink(d.path().join("outside.txt"), root.join("b.txt")).unwrap();
        let c = Corpus::load(root.to_str().unwrap()).unwrap();
        assert_eq!(c.files.len(), 2, "{:?}", c.files);
        assert_eq!(c.bytes, b"betaalpha ");
    }

    #[test]
    fn tokenizer_round_trips_any_text() {
        let s = "Hello, wörld! \u{1F600}\n\t";
        let t = tokenizer::encode(s);
        assert_eq!(t.len(), s.len());
        assert!(t.iter().all(|&x| (0..256).contains(&x)));
        assert_eq!(tokenizer::decode(&t).unwrap(), s);
    }

    #[test]
    fn tokenizer_rejects_out_of_range_tokens() {
        assert_eq!(tokenizer::decode(&[65, 256]), Err(256));
        assert_eq!(tokenizer::decode(&[-1]), Err(-1));
    }

    #[test]
    fn loads_file_dir_and_glob_in_sorted_order() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("sub")).unwrap();
        std::fs::write(d.path().join("b.txt"), "bbb").unwrap();
        std::fs::write(d.path().join("a.txt"), "aaa").unwrap();
        std::fs::write(d.path().join("sub/c.md"), "ccc").unwrap();
        let dir = Corpus::load(d.path().to_str().unwrap()).unwrap();
        assert_eq!(dir.bytes, b"aaabbbccc");
        let g = Corpus::load(&format!("{}/*.txt", d.path().display())).unwrap();
        assert_eq!(g.bytes, b"aaabbb");
        let f = Corpus::load(d.path().join("sub/c.md").to_str().unwrap()).unwrap();
        assert_eq!(f.bytes, b"ccc");
        assert_eq!(f.sha256.len(), 64);
    }

    #[test]
    fn missing_and_empty_corpora_are_clear_errors() {
        let d = tempfile::tempdir().unwrap();
        let missing = d.path().join("nope.txt");
        let e = Corpus::load(missing.to_str().unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("does not exist") && e.contains("nope.txt"),
            "{e}"
        );
        std::fs::write(d.path().join("empty.txt"), "").unwrap();
        let e = Corpus::load(d.path().join("empty.txt").to_str().unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("empty"), "{e}");
        let e = Corpus::load(&format!("{}/*.zzz", d.path().display()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("matches no files"), "{e}");
    }

    #[test]
    fn split_keeps_the_tail_for_validation_and_checks_size() {
        let c = Corpus {
            bytes: (0..100u8).collect(),
            files: vec![],
            sha256: String::new(),
            spec: "x".into(),
        };
        let (tr, va) = c.split(0.1, 8).unwrap();
        assert_eq!(tr.len(), 90);
        assert_eq!(va, (90..100u8).collect::<Vec<_>>());
        let e = c.split(0.1, 16).unwrap_err().to_string();
        assert!(e.contains("too small"), "{e}");
    }
}
