//! The counting pass of training: stream the files line by line (each line keeps its
//! newline, as `tokenizers` reads them, so no pre-token crosses a line), pre-tokenize in
//! parallel, and count distinct pre-tokens with 64-bit counts.
//!
//! Memory is bounded by `max_memory`: when the estimated size of the map passes it, the
//! rarest words are dropped (count 1 first, then 2, ...) until it is under half the budget,
//! as word2vec's vocabulary reduction does. Dropped words and occurrences are reported.

use std::fs::File;
use std::io::Read;
use std::path::PathBuf;

use rayon::prelude::*;

use super::added::{AddedVocab, Segment};
use super::hash::FastMap;
use super::pretokenize::PreTokenizer;
use super::{ModelKind, Progress, TrainOptions};
use crate::{Error, Result};

/// Bytes read from a file at a time.
const CHUNK_BYTES: usize = 4 << 20;
/// Estimated bytes a map entry costs beyond its key: boxed key header, count, table slot, allocator.
const ENTRY_OVERHEAD: u64 = 56;

/// Distinct pre-tokens with their counts, and what the memory bound dropped.
pub(crate) struct WordCounts {
    pub(crate) counts: FastMap<Box<[u8]>, u64>,
    pub(crate) dropped_words: u64,
    pub(crate) dropped_occurrences: u64,
    /// The highest count that was dropped.
    pub(crate) prune_threshold: u64,
}

/// Counts the pre-tokens of every line of `files`. Added tokens in the text are skipped.
pub(crate) fn count_words(
    files: &[PathBuf],
    pre: &PreTokenizer,
    added: &AddedVocab,
    max_memory: Option<u64>,
    progress: &dyn Fn(Progress),
) -> Result<WordCounts> {
    let mut total_bytes = 0;
    for path in files {
        total_bytes += std::fs::metadata(path).map_err(|e| Error::io(path, e))?.len();
    }
    let mut state = WordCounts {
        counts: FastMap::default(),
        dropped_words: 0,
        dropped_occurrences: 0,
        prune_threshold: 0,
    };
    let mut map_bytes = 0u64;
    let mut bytes_read = 0u64;
    progress(Progress::Counting { bytes_read, total_bytes });
    for path in files {
        let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
        let mut buffer: Vec<u8> = Vec::with_capacity(CHUNK_BYTES + 4096);
        loop {
            let carried = buffer.len();
            buffer.resize(carried + CHUNK_BYTES, 0);
            let n = read_full(&mut file, &mut buffer[carried..]).map_err(|e| Error::io(path, e))?;
            buffer.truncate(carried + n);
            let at_eof = n == 0;
            // Whole lines only; the tail waits for the next read (or ends the file).
            let complete = if at_eof {
                buffer.len()
            } else {
                match buffer.iter().rposition(|&b| b == b'\n') {
                    Some(p) => p + 1,
                    None => continue, // a line longer than the chunk: read more
                }
            };
            for (borrowed, owned) in count_chunk(&buffer[..complete], pre, added) {
                let owned = owned.iter().map(|(k, v)| (k.as_slice(), *v));
                for (word, count) in borrowed.into_iter().chain(owned) {
                    match state.counts.get_mut(word) {
                        Some(c) => *c += count,
                        None => {
                            map_bytes += word.len() as u64 + ENTRY_OVERHEAD;
                            state.counts.insert(word.into(), count);
                        }
                    }
                }
            }
            if let Some(budget) = max_memory {
                if map_bytes > budget {
                    map_bytes = prune(&mut state, budget / 2);
                }
            }
            bytes_read += complete as u64;
            progress(Progress::Counting { bytes_read, total_bytes });
            buffer.drain(..complete);
            if at_eof {
                break;
            }
        }
    }
    Ok(state)
}

/// Reads until `buf` is full or the file ends; returns the bytes read.
fn read_full(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Pre-token counts of one slice of a chunk: pieces borrowed from the chunk, and pieces
/// the pre-tokenizer rewrote (Metaspace, prefix space), which are not slices of it.
type LocalCounts<'a> = (FastMap<&'a [u8], u64>, FastMap<Vec<u8>, u64>);

/// Counts a chunk of whole lines in parallel, one pair of maps per slice of lines.
fn count_chunk<'a>(chunk: &'a [u8], pre: &PreTokenizer, added: &AddedVocab) -> Vec<LocalCounts<'a>> {
    let parts = rayon::current_num_threads().max(1) * 4;
    let mut bounds = vec![0usize];
    for k in 1..parts {
        let target = chunk.len() * k / parts;
        let last = *bounds.last().expect("bounds starts with 0");
        if target <= last {
            continue;
        }
        match chunk[target..].iter().position(|&b| b == b'\n') {
            Some(p) if target + p + 1 < chunk.len() => bounds.push(target + p + 1),
            _ => break,
        }
    }
    bounds.push(chunk.len());
    bounds.dedup();
    let slices: Vec<&'a [u8]> = bounds.windows(2).map(|w| &chunk[w[0]..w[1]]).collect();
    slices
        .par_iter()
        .map(|&slice| {
            let mut borrowed: FastMap<&'a [u8], u64> = FastMap::default();
            let mut owned: FastMap<Vec<u8>, u64> = FastMap::default();
            let mut scratch = Vec::new();
            for line in slice.split_inclusive(|&b| b == b'\n') {
                added.split(line, |segment| {
                    if let Segment::Text(text, at_start) = segment {
                        pre.split(text, at_start, &mut scratch, &mut |piece| {
                            if is_within(piece, chunk) {
                                *borrowed.entry(subslice(chunk, piece)).or_insert(0) += 1;
                            } else if let Some(c) = owned.get_mut(piece) {
                                *c += 1;
                            } else {
                                owned.insert(piece.to_vec(), 1);
                            }
                        })
                    }
                });
            }
            (borrowed, owned)
        })
        .collect()
}

/// Whether `part` points inside `whole`.
fn is_within(part: &[u8], whole: &[u8]) -> bool {
    let start = part.as_ptr() as usize;
    let base = whole.as_ptr() as usize;
    start >= base && start + part.len() <= base + whole.len()
}

/// `part` re-borrowed from `whole` (it must lie inside it).
fn subslice<'a>(whole: &'a [u8], part: &[u8]) -> &'a [u8] {
    let offset = part.as_ptr() as usize - whole.as_ptr() as usize;
    &whole[offset..offset + part.len()]
}

/// Drops the rarest words until the map's estimated size is at most `target` bytes.
/// Returns the new estimated size.
fn prune(state: &mut WordCounts, target: u64) -> u64 {
    let mut size: u64 = state.counts.keys().map(|k| k.len() as u64 + ENTRY_OVERHEAD).sum();
    let mut threshold = state.prune_threshold.max(1);
    while size > target && !state.counts.is_empty() {
        let mut dropped_words = 0;
        let mut dropped_occurrences = 0;
        let mut freed = 0;
        state.counts.retain(|word, count| {
            if *count <= threshold {
                dropped_words += 1;
                dropped_occurrences += *count;
                freed += word.len() as u64 + ENTRY_OVERHEAD;
                false
            } else {
                true
            }
        });
        state.dropped_words += dropped_words;
        state.dropped_occurrences += dropped_occurrences;
        state.prune_threshold = state.prune_threshold.max(threshold);
        size -= freed;
        threshold += 1;
    }
    size
}

/// A cheap estimate, from file sizes alone, of training's peak memory (bytes) and time
/// (seconds on this machine's cores), for the CLI to print before it starts.
pub fn estimate(files: &[PathBuf], opts: &TrainOptions) -> Result<(u64, f64)> {
    let mut total = 0u64;
    for path in files {
        total += std::fs::metadata(path).map_err(|e| Error::io(path, e))?.len();
    }
    // Heaps' law for distinct pre-tokens of English-like text, fitted on our corpora
    // (about 30k distinct in 1 MB): V = 2.2 * N^0.68 with N the bytes.
    let distinct = 2.2 * (total.max(1) as f64).powf(0.68);
    let mut words_bytes = (distinct * (10.0 + ENTRY_OVERHEAD as f64)) as u64;
    if let Some(budget) = opts.max_memory {
        words_bytes = words_bytes.min(budget);
    }
    // The trainer keeps symbol lists, pair counts and queue entries: a few times the map.
    let model_factor = match opts.model {
        ModelKind::Bpe => 4.0,
        ModelKind::Unigram => 12.0,
        ModelKind::Char => 1.0,
    };
    let bytes = (words_bytes as f64 * model_factor) as u64 + CHUNK_BYTES as u64 * 3;
    let threads = rayon::current_num_threads().max(1) as f64;
    let counting_seconds = total as f64 / (25e6 * threads);
    let training_seconds = match opts.model {
        ModelKind::Bpe => distinct * 2e-6 + opts.vocab_size as f64 * 3e-5,
        ModelKind::Unigram => distinct * 4e-5,
        ModelKind::Char => 0.0,
    };
    Ok((bytes, counting_seconds + training_seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pruning_drops_the_rarest_first() {
        let mut state = WordCounts {
            counts: FastMap::default(),
            dropped_words: 0,
            dropped_occurrences: 0,
            prune_threshold: 0,
        };
        for (w, c) in [("a", 1u64), ("b", 1), ("c", 2), ("d", 9)] {
            state.counts.insert(w.as_bytes().into(), c);
        }
        let left = prune(&mut state, 2 * (1 + ENTRY_OVERHEAD));
        assert_eq!(left, 2 * (1 + ENTRY_OVERHEAD));
        assert_eq!(state.dropped_words, 2);
        assert_eq!(state.dropped_occurrences, 2);
        assert!(state.counts.contains_key(&b"d"[..]));
    }
}
