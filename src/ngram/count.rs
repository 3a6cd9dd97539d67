//! Counting: stream the corpus once and count every highest-order n-gram.
//!
//! Input: training text, one sentence a line. Output: [`PaddedCounts`], the
//! distinct N-grams of the padded sentences with their counts, sorted in suffix
//! order (compare the last word first, then leftwards), which is the order the
//! adjust stage needs.
//!
//! Sentences are padded as lmplz pads them: N-1 copies of `<s>` in front and one
//! `</s>` at the end, and one N-gram ends at each word and at `</s>`. So the
//! start of a sentence is seen through N-grams like `<s> <s> w1`, from which the
//! adjust stage recovers the shorter n-grams `<s> w1` and `w1`.
//!
//! N-grams are fixed-width arrays of u32 ids in flat vectors. They are collected
//! in blocks; a full block is sorted and its duplicates merged into a sorted run.
//! Runs are k-way merged at the end. With a memory budget the block size follows
//! from the budget (up to the default block size) and runs spill to temporary files
//! (as lmplz does), so the counting pass needs at most about the budget plus the
//! distinct N-grams.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use super::vocab::{words, LineReader, Vocabulary, BOS, BOS_WORD, EOS, EOS_WORD, UNK_WORD};
use crate::{Error, Result};

/// The distinct padded N-grams of a corpus with their counts, in suffix order.
pub(crate) struct PaddedCounts {
    /// N, the width of every n-gram.
    pub order: usize,
    /// The n-grams, `order` ids each, oldest word first.
    pub words: Vec<u32>,
    /// How often each n-gram occurs.
    pub counts: Vec<u64>,
}

impl PaddedCounts {
    /// Number of distinct n-grams.
    pub(crate) fn len(&self) -> usize {
        self.counts.len()
    }

    /// The `row`-th n-gram.
    pub(crate) fn ngram(&self, row: usize) -> &[u32] {
        &self.words[row * self.order..(row + 1) * self.order]
    }
}

/// What [`count_ngrams`] needs to know besides the text.
pub(crate) struct CountOptions {
    pub order: usize,
    pub skip_symbols: bool,
    pub memory_bytes: Option<u64>,
}

/// Counts the padded N-grams of `reader` (named `source` in errors), adding new
/// words to `vocab`.
pub(crate) fn count_ngrams<R: BufRead>(
    reader: R,
    source: &Path,
    opts: &CountOptions,
    vocab: &mut Vocabulary,
) -> Result<PaddedCounts> {
    let order = opts.order;
    let mut lines = LineReader::new(reader, source);
    let mut sorter = RunSorter::new(order, opts.memory_bytes);
    // The last N words, oldest first; reset to <s> padding at each sentence.
    let mut window = vec![BOS; order];
    let mut word_count = 0_u64;
    while let Some((line_number, line)) = lines.next_line()? {
        window.fill(BOS);
        for word in words(line) {
            let id = match vocab.id(word) {
                Some(id) if id <= EOS => {
                    if opts.skip_symbols {
                        continue;
                    }
                    return Err(Error::Parse {
                        path: source.to_path_buf(),
                        line: line_number,
                        message: format!(
                            "the training text contains `{word}`, which the model reserves for itself \
                             ({UNK_WORD}, {BOS_WORD}, {EOS_WORD}); pass --skip-symbols to drop such tokens"
                        ),
                    });
                }
                Some(id) => id,
                None => vocab.id_or_insert(word),
            };
            slide(&mut window, id);
            sorter.push(&window)?;
            word_count += 1;
        }
        slide(&mut window, EOS);
        sorter.push(&window)?;
    }
    if word_count == 0 {
        return Err(Error::Invalid(format!(
            "{}: the corpus holds no words; an n-gram model needs some training text",
            source.display()
        )));
    }
    sorter.finish()
}

/// Shifts `window` left by one word and puts `word` last.
fn slide(window: &mut [u32], word: u32) {
    window.copy_within(1.., 0);
    let last = window.len() - 1;
    window[last] = word;
}

/// A sorted run of distinct n-grams, each stored reversed (last word first) so
/// that plain lexicographic order is suffix order.
enum Run {
    Memory { words: Vec<u32>, counts: Vec<u64> },
    Disk { file: SpillFile, rows: usize },
}

/// Blocks of reversed n-grams, sorted into runs and merged.
struct RunSorter {
    order: usize,
    block: Vec<u32>,
    block_rows: usize,
    spill: bool,
    runs: Vec<Run>,
}

/// Rows per block when no memory budget is given (about 16 MiB per word of order).
const DEFAULT_BLOCK_ROWS: usize = 1 << 22;

impl RunSorter {
    fn new(order: usize, memory_bytes: Option<u64>) -> Self {
        let (block_rows, spill) = match memory_bytes {
            // A block, its sorted copy and the run made of it (ids plus a u64 count)
            // fit the budget; no larger than the default either, so a generous budget
            // is a ceiling, not a target (runs of repetitive text shrink as they merge).
            Some(bytes) => {
                let per_row = (order * 4 * 3 + 8) as u64;
                ((bytes / per_row).clamp(1024, DEFAULT_BLOCK_ROWS as u64) as usize, true)
            }
            None => (DEFAULT_BLOCK_ROWS, false),
        };
        RunSorter {
            order,
            block: Vec::new(),
            block_rows,
            spill,
            runs: Vec::new(),
        }
    }

    fn push(&mut self, window: &[u32]) -> Result<()> {
        if self.block.len() == self.block.capacity() {
            // Grow by doubling, but never past the block size (Vec's own growth
            // could overshoot the budget by half).
            let limit = self.block_rows * self.order;
            let wanted = (2 * self.block.capacity())
                .max(4096 * self.order)
                .min(limit);
            self.block.reserve_exact(wanted - self.block.len());
        }
        self.block.extend(window.iter().rev());
        if self.block.len() >= self.block_rows * self.order {
            self.flush()?;
        }
        Ok(())
    }

    /// Sorts the block, merges duplicates, and keeps or spills the run.
    fn flush(&mut self) -> Result<()> {
        if self.block.is_empty() {
            return Ok(());
        }
        sort_rows(&mut self.block, self.order);
        let (words, counts) = merge_duplicates(&self.block, self.order);
        self.block.clear();
        if self.spill {
            let file = SpillFile::write(&words, &counts, self.order)?;
            self.runs.push(Run::Disk {
                file,
                rows: counts.len(),
            });
        } else {
            self.runs.push(Run::Memory { words, counts });
        }
        Ok(())
    }

    fn finish(mut self) -> Result<PaddedCounts> {
        let order = self.order;
        let (mut words, counts) = if self.runs.is_empty() {
            // Everything is still in the block: no need to touch the disk.
            sort_rows(&mut self.block, order);
            merge_duplicates(&self.block, order)
        } else {
            self.flush()?;
            merge_runs(std::mem::take(&mut self.runs), order)?
        };
        for row in words.chunks_exact_mut(order) {
            row.reverse();
        }
        Ok(PaddedCounts {
            order,
            words,
            counts,
        })
    }
}

/// Sorts the rows (each `order` ids) of `block` lexicographically.
fn sort_rows(block: &mut [u32], order: usize) {
    macro_rules! fixed_width {
        ($($width:literal)*) => {
            match order {
                $($width => sort_fixed_rows::<$width>(block),)*
                _ => sort_rows_any_width(block, order),
            }
        };
    }
    fixed_width!(1 2 3 4 5 6 7 8);
}

/// [`sort_rows`] for rows of a width known at compile time: sorting arrays
/// compares inline, several times faster than sorting through a permutation.
fn sort_fixed_rows<const WIDTH: usize>(block: &mut [u32]) {
    let mut rows: Vec<[u32; WIDTH]> = block
        .chunks_exact(WIDTH)
        .map(|row| row.try_into().expect("chunks_exact gives WIDTH ids"))
        .collect();
    rows.sort_unstable();
    for (slot, row) in block.chunks_exact_mut(WIDTH).zip(&rows) {
        slot.copy_from_slice(row);
    }
}

/// [`sort_rows`] for orders without a fixed-width specialisation.
fn sort_rows_any_width(block: &mut [u32], order: usize) {
    let rows = block.len() / order;
    let mut permutation: Vec<usize> = (0..rows).collect();
    permutation.sort_unstable_by(|&a, &b| {
        block[a * order..(a + 1) * order].cmp(&block[b * order..(b + 1) * order])
    });
    let sorted: Vec<u32> = permutation
        .iter()
        .flat_map(|&row| block[row * order..(row + 1) * order].iter().copied())
        .collect();
    block.copy_from_slice(&sorted);
}

/// Collapses equal adjacent rows of a sorted block, counting them.
fn merge_duplicates(block: &[u32], order: usize) -> (Vec<u32>, Vec<u64>) {
    let mut words: Vec<u32> = Vec::new();
    let mut counts: Vec<u64> = Vec::new();
    for row in block.chunks_exact(order) {
        match counts.last_mut() {
            Some(count) if &words[words.len() - order..] == row => *count += 1,
            _ => {
                words.extend_from_slice(row);
                counts.push(1);
            }
        }
    }
    (words, counts)
}

/// A cursor over one run during the merge.
enum RunCursor {
    Memory {
        words: Vec<u32>,
        counts: Vec<u64>,
        next: usize,
    },
    Disk {
        reader: BufReader<File>,
        path: PathBuf,
        left: usize,
        _file: SpillFile,
    },
}

impl RunCursor {
    /// Writes the next row into `row` and returns its count, or `None` at the end.
    fn next(&mut self, row: &mut [u32]) -> Result<Option<u64>> {
        match self {
            RunCursor::Memory {
                words,
                counts,
                next,
            } => {
                if *next == counts.len() {
                    return Ok(None);
                }
                let order = row.len();
                row.copy_from_slice(&words[*next * order..(*next + 1) * order]);
                *next += 1;
                Ok(Some(counts[*next - 1]))
            }
            RunCursor::Disk {
                reader, path, left, ..
            } => {
                if *left == 0 {
                    return Ok(None);
                }
                *left -= 1;
                let mut buf = [0_u8; 8];
                for id in row.iter_mut() {
                    reader
                        .read_exact(&mut buf[..4])
                        .map_err(|e| Error::io(&*path, e))?;
                    *id = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
                }
                reader
                    .read_exact(&mut buf)
                    .map_err(|e| Error::io(&*path, e))?;
                Ok(Some(u64::from_le_bytes(buf)))
            }
        }
    }
}

/// k-way merge of sorted runs, summing the counts of equal rows.
fn merge_runs(runs: Vec<Run>, order: usize) -> Result<(Vec<u32>, Vec<u64>)> {
    let mut cursors = Vec::with_capacity(runs.len());
    for run in runs {
        cursors.push(match run {
            Run::Memory { words, counts } => RunCursor::Memory {
                words,
                counts,
                next: 0,
            },
            Run::Disk { file, rows } => {
                let handle = File::open(&file.path).map_err(|e| Error::io(&file.path, e))?;
                RunCursor::Disk {
                    reader: BufReader::with_capacity(1 << 16, handle),
                    path: file.path.clone(),
                    left: rows,
                    _file: file,
                }
            }
        });
    }
    // Heap of (row, count, run); ties between runs go to the lower run index.
    let mut heap = BinaryHeap::new();
    for (index, cursor) in cursors.iter_mut().enumerate() {
        let mut row = vec![0; order];
        if let Some(count) = cursor.next(&mut row)? {
            heap.push(Reverse((row, count, index)));
        }
    }
    let mut words: Vec<u32> = Vec::new();
    let mut counts: Vec<u64> = Vec::new();
    while let Some(Reverse((mut row, count, index))) = heap.pop() {
        match counts.last_mut() {
            Some(last) if words[words.len() - order..] == row[..] => *last += count,
            _ => {
                words.extend_from_slice(&row);
                counts.push(count);
            }
        }
        if let Some(next_count) = cursors[index].next(&mut row)? {
            heap.push(Reverse((row, next_count, index)));
        }
    }
    Ok((words, counts))
}

/// A temporary file holding one sorted run; removed when dropped.
struct SpillFile {
    path: PathBuf,
}

impl SpillFile {
    /// Writes a run: per row, `order` little-endian u32 ids then a u64 count.
    fn write(words: &[u32], counts: &[u64], order: usize) -> Result<Self> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "nlp-ngram-{}-{}.run",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let path = std::env::temp_dir().join(name);
        let handle = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        let file = SpillFile { path };
        let mut out = BufWriter::with_capacity(1 << 16, handle);
        let written: std::io::Result<()> = (|| {
            for (row, count) in words.chunks_exact(order).zip(counts) {
                for id in row {
                    out.write_all(&id.to_le_bytes())?;
                }
                out.write_all(&count.to_le_bytes())?;
            }
            out.flush()
        })();
        written.map_err(|e| Error::io(&file.path, e))?;
        Ok(file)
    }
}

impl Drop for SpillFile {
    fn drop(&mut self) {
        // Best effort: a leftover file in the temp directory is harmless.
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(text: &str, order: usize, memory_bytes: Option<u64>) -> (PaddedCounts, Vocabulary) {
        let mut vocab = Vocabulary::with_specials();
        let opts = CountOptions {
            order,
            skip_symbols: false,
            memory_bytes,
        };
        let counts =
            count_ngrams(text.as_bytes(), Path::new("t.txt"), &opts, &mut vocab).expect("counts");
        (counts, vocab)
    }

    #[test]
    fn counts_padded_trigrams_in_suffix_order() {
        // a=3 b=4
        let (counts, _) = count("a b\na\n", 3, None);
        let rows: Vec<(Vec<u32>, u64)> = (0..counts.len())
            .map(|i| (counts.ngram(i).to_vec(), counts.counts[i]))
            .collect();
        assert_eq!(
            rows,
            vec![
                (vec![1, 3, 2], 1), // <s> a </s>
                (vec![3, 4, 2], 1), // a b </s>
                (vec![1, 1, 3], 2), // <s> <s> a
                (vec![1, 3, 4], 1), // <s> a b
            ]
        );
    }

    #[test]
    fn spilled_runs_merge_to_the_same_counts() {
        let text: String = (0..3000)
            .map(|i| format!("w{} x{} w{}\n", i % 37, i % 11, i % 5))
            .collect();
        let (in_memory, _) = count(&text, 4, None);
        let (spilled, _) = count(&text, 4, Some(1));
        assert_eq!(in_memory.words, spilled.words);
        assert_eq!(in_memory.counts, spilled.counts);
    }

    #[test]
    fn reserved_symbols_are_an_error_unless_skipped() {
        let mut vocab = Vocabulary::with_specials();
        let opts = CountOptions {
            order: 2,
            skip_symbols: false,
            memory_bytes: None,
        };
        let err = count_ngrams(
            "a\nb <unk> c\n".as_bytes(),
            Path::new("c.txt"),
            &opts,
            &mut vocab,
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(
            err.starts_with("c.txt:2:") && err.contains("--skip-symbols"),
            "{err}"
        );

        let mut vocab = Vocabulary::with_specials();
        let opts = CountOptions {
            order: 2,
            skip_symbols: true,
            memory_bytes: None,
        };
        let counts = count_ngrams(
            "b <unk> c <s>\n".as_bytes(),
            Path::new("c.txt"),
            &opts,
            &mut vocab,
        )
        .expect("counts");
        // <s> b, b c, c </s>
        assert_eq!(counts.len(), 3);
    }

    #[test]
    fn an_empty_corpus_is_an_error() {
        let mut vocab = Vocabulary::with_specials();
        let opts = CountOptions {
            order: 3,
            skip_symbols: false,
            memory_bytes: None,
        };
        assert!(count_ngrams("".as_bytes(), Path::new("e.txt"), &opts, &mut vocab).is_err());
        assert!(count_ngrams(" \n\t\n".as_bytes(), Path::new("e.txt"), &opts, &mut vocab).is_err());
    }
}
