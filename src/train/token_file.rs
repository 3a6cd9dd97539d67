//! Token files: a corpus encoded once into little-endian u16 or u32 ids behind a small
//! header, memory-mapped for training (as nanoGPT's `train.bin` / `val.bin`, plus the
//! magic number and version that llm.c's files carry).
//!
//! Layout: `b"NLPTOKEN"`, version (u32 = 1), bytes per id (u32: 2 or 4), count (u64),
//! then `count` ids. The split follows nanoGPT: the first `1 - val_fraction` of the
//! corpus's tokens train, the rest validate.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::fsutil::AtomicFile;
use crate::{Error, Result};

const MAGIC: &[u8; 8] = b"NLPTOKEN";
const VERSION: u32 = 1;
const HEADER_LEN: usize = 24;

/// The width of the ids in a token file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenDtype {
    /// 2 bytes: vocabularies up to 65,536.
    U16,
    /// 4 bytes.
    U32,
}

impl TokenDtype {
    /// Bytes per id.
    pub fn width(self) -> usize {
        match self {
            TokenDtype::U16 => 2,
            TokenDtype::U32 => 4,
        }
    }

    /// The dtype `train.token_dtype` asks for, checked against the vocabulary.
    pub fn choose(spec: &str, vocab_size: usize) -> Result<TokenDtype> {
        let fits_u16 = vocab_size <= 1 << 16;
        match spec {
            "u16" if !fits_u16 => Err(Error::Config {
                path: PathBuf::from("configuration"),
                key: "train.token_dtype".into(),
                message: format!(
                    "a vocabulary of {vocab_size} ids does not fit in u16 (at most 65536); use \"u32\" or \"auto\""
                ),
            }),
            "u16" => Ok(TokenDtype::U16),
            "u32" => Ok(TokenDtype::U32),
            _ if fits_u16 => Ok(TokenDtype::U16),
            _ => Ok(TokenDtype::U32),
        }
    }
}

/// Writes `ids` as a token file at `path`, atomically.
pub fn write_token_file(path: &Path, ids: &[u32], dtype: TokenDtype) -> Result<()> {
    if dtype == TokenDtype::U16 {
        if let Some(&id) = ids.iter().find(|&&id| id > u16::MAX as u32) {
            return Err(Error::Invalid(format!(
                "{}: token id {id} does not fit in u16; set train.token_dtype = \"u32\"",
                path.display()
            )));
        }
    }
    let mut bytes = Vec::with_capacity(HEADER_LEN + ids.len() * dtype.width());
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&VERSION.to_le_bytes());
    bytes.extend_from_slice(&(dtype.width() as u32).to_le_bytes());
    bytes.extend_from_slice(&(ids.len() as u64).to_le_bytes());
    match dtype {
        TokenDtype::U16 => ids
            .iter()
            .for_each(|&id| bytes.extend_from_slice(&(id as u16).to_le_bytes())),
        TokenDtype::U32 => ids
            .iter()
            .for_each(|&id| bytes.extend_from_slice(&id.to_le_bytes())),
    }
    let mut file = AtomicFile::create(path)?;
    file.write_all(&bytes).map_err(|e| Error::io(path, e))?;
    file.commit()
}

/// A memory-mapped token file.
#[derive(Debug)]
pub struct TokenFile {
    map: Mmap,
    dtype: TokenDtype,
    len: usize,
}

impl TokenFile {
    /// Maps `path` and checks its header.
    pub fn open(path: &Path) -> Result<TokenFile> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the file is only read; token files are written atomically (a new
        // inode), so a concurrent writer cannot change the mapped bytes.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let bad = |message: String| {
            Err(Error::Invalid(format!(
                "{}: {message}; delete it to have the corpus tokenized again",
                path.display()
            )))
        };
        if map.len() < HEADER_LEN || &map[..8] != MAGIC {
            return bad("not an nlp token file (bad magic number)".into());
        }
        let word = |at: usize| u32::from_le_bytes(map[at..at + 4].try_into().expect("4 bytes"));
        if word(8) != VERSION {
            return bad(format!("token file version {} is not {VERSION}", word(8)));
        }
        let dtype = match word(12) {
            2 => TokenDtype::U16,
            4 => TokenDtype::U32,
            other => return bad(format!("{other} bytes per token is neither 2 nor 4")),
        };
        let len = u64::from_le_bytes(map[16..24].try_into().expect("8 bytes")) as usize;
        if map.len() != HEADER_LEN + len * dtype.width() {
            return bad(format!(
                "the header says {len} tokens but the file is {} bytes",
                map.len()
            ));
        }
        Ok(TokenFile { map, dtype, len })
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the file holds no token.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The width of the ids.
    pub fn dtype(&self) -> TokenDtype {
        self.dtype
    }

    /// Copies ids `start..start + out.len()` into `out`.
    #[inline]
    pub fn read_into(&self, start: usize, out: &mut [u32]) {
        let body = &self.map[HEADER_LEN..];
        match self.dtype {
            TokenDtype::U16 => {
                let bytes = &body[2 * start..2 * (start + out.len())];
                for (slot, pair) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *slot = u16::from_le_bytes([pair[0], pair[1]]) as u32;
                }
            }
            TokenDtype::U32 => {
                let bytes = &body[4 * start..4 * (start + out.len())];
                for (slot, quad) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *slot = u32::from_le_bytes([quad[0], quad[1], quad[2], quad[3]]);
                }
            }
        }
    }

    /// The largest id, for checking a file against a vocabulary.
    pub fn max_id(&self) -> Option<u32> {
        let mut out = vec![0u32; self.len];
        self.read_into(0, &mut out);
        out.into_iter().max()
    }
}

/// Splits `ids` nanoGPT's way: the first `1 - val_fraction` train, the rest validate.
pub fn split(ids: &[u32], val_fraction: f64) -> (&[u32], &[u32]) {
    let train_len = ((ids.len() as f64) * (1.0 - val_fraction)) as usize;
    ids.split_at(train_len.min(ids.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_both_widths_and_reject_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let ids: Vec<u32> = (0..1000).map(|i| (i * 37) % 300).collect();
        for dtype in [TokenDtype::U16, TokenDtype::U32] {
            let path = dir.path().join("t.bin");
            write_token_file(&path, &ids, dtype).unwrap();
            let file = TokenFile::open(&path).unwrap();
            assert_eq!((file.len(), file.dtype()), (1000, dtype));
            let mut out = vec![0; 10];
            file.read_into(990, &mut out);
            assert_eq!(out, ids[990..]);
            assert_eq!(file.max_id(), Some(299));
        }
        let path = dir.path().join("t.bin");
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.truncate(bytes.len() - 1);
        std::fs::write(&path, &bytes).unwrap();
        assert!(TokenFile::open(&path)
            .unwrap_err()
            .to_string()
            .contains("header says"));
        bytes[0] = b'X';
        std::fs::write(&path, &bytes).unwrap();
        assert!(TokenFile::open(&path)
            .unwrap_err()
            .to_string()
            .contains("magic"));
    }

    #[test]
    fn vocabulary_too_large_for_u16_is_refused() {
        assert_eq!(TokenDtype::choose("auto", 65_536).unwrap(), TokenDtype::U16);
        assert_eq!(TokenDtype::choose("auto", 65_537).unwrap(), TokenDtype::U32);
        let err = TokenDtype::choose("u16", 100_000).unwrap_err().to_string();
        assert!(
            err.contains("train.token_dtype") && err.contains("100000"),
            "{err}"
        );
        let dir = tempfile::tempdir().unwrap();
        assert!(write_token_file(&dir.path().join("t.bin"), &[70_000], TokenDtype::U16).is_err());
    }

    #[test]
    fn split_is_first_ninety_percent() {
        let ids: Vec<u32> = (0..100).collect();
        let (train, val) = split(&ids, 0.1);
        assert_eq!((train.len(), val.len(), val[0]), (90, 10, 90));
    }
}
