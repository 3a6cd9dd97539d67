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
use std::collections::binary_heap::{BinaryHeap, PeekMut};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use rayon::slice::ParallelSliceMut;

use super::vocab::{split_words, LineReader, Vocabulary, BOS, BOS_WORD, EOS, EOS_WORD, UNK_WORD};
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
    while let Some((line_number, line)) = lines.next_bytes()? {
        window.fill(BOS);
        for word in split_words(line) {
            let id = match vocab.id(word) {
                Some(id) if id <= EOS => {
                    if opts.skip_symbols {
                        continue;
                    }
                    let word = String::from_utf8_lossy(word);
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
                // Only a new word needs checking: the known ones were checked when added.
                None => vocab.id_or_insert(word).map_err(|bad| {
                    let column = word.as_ptr() as usize - line.as_ptr() as usize + bad + 1;
                    Error::Parse {
                        path: source.to_path_buf(),
                        line: line_number,
                        message: format!("expected UTF-8 text, found an invalid byte at column {column}"),
                    }
                })?,
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

/// Blocks of reversed n-grams, sorted into runs and merged. A full block is sorted
/// on a worker thread while the next one fills, so counting uses two cores.
struct RunSorter {
    order: usize,
    block: Vec<u32>,
    block_rows: usize,
    spill: bool,
    runs: Vec<Run>,
    /// The worker sorting the previous block; it hands back the run and, for a
    /// spilled run, the emptied block buffer, which the next flush reuses.
    sorting: Option<JoinHandle<Result<SortedBlock>>>,
    spare: Vec<u32>,
}

/// A block made into a run, and the block's buffer when the run does not keep it.
type SortedBlock = (Run, Vec<u32>);

/// Rows per block when no memory budget is given (about 16 MiB per word of order).
const DEFAULT_BLOCK_ROWS: usize = 1 << 22;

impl RunSorter {
    fn new(order: usize, memory_bytes: Option<u64>) -> Self {
        let (block_rows, spill) = match memory_bytes {
            // The block that fills, the block being sorted in place and the run made
            // of it (ids plus a u64 count) fit the budget; no larger than the default
            // either, so a generous budget is a ceiling, not a target (runs of
            // repetitive text shrink as they merge).
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
            sorting: None,
            spare: Vec::new(),
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

    /// Hands the block to a worker that sorts it, merges duplicates, and keeps or
    /// spills the run; waits first for the previous block's worker.
    fn flush(&mut self) -> Result<()> {
        if self.block.is_empty() {
            return Ok(());
        }
        self.collect_run()?;
        let full = std::mem::replace(&mut self.block, std::mem::take(&mut self.spare));
        let (order, spill) = (self.order, self.spill);
        self.sorting = Some(std::thread::spawn(move || make_run(full, order, spill, false)));
        Ok(())
    }

    /// Waits for the worker, if one is sorting, and keeps its run.
    fn collect_run(&mut self) -> Result<()> {
        if let Some(worker) = self.sorting.take() {
            let (run, spare) = worker
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))?;
            self.spare = spare;
            self.runs.push(run);
        }
        Ok(())
    }

    fn finish(mut self) -> Result<PaddedCounts> {
        let order = self.order;
        let (mut words, counts) = if self.runs.is_empty() && self.sorting.is_none() {
            // Everything is still in the block: no need to touch the disk.
            sort_rows(&mut self.block, order, true);
            let counts = merge_duplicates(&mut self.block, order);
            (std::mem::take(&mut self.block), counts)
        } else {
            // The last block is sorted here, on every core, since nothing else is
            // left to do meanwhile.
            self.collect_run()?;
            let last = std::mem::take(&mut self.block);
            if !last.is_empty() {
                self.runs.push(make_run(last, order, self.spill, true)?.0);
            }
            // The buffers are done with; free them before the merged counts grow.
            self.spare = Vec::new();
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

/// Sorts a full block (with rayon when `parallel`) and merges its duplicates into a
/// run. A run kept in memory takes the block; a spilled run is streamed to disk and
/// gives the block back emptied for reuse. (Reusing it, and allocating nothing large
/// on the worker, keeps glibc's malloc from holding tens of megabytes in the
/// worker's arena.)
fn make_run(
    mut block: Vec<u32>,
    order: usize,
    spill: bool,
    parallel: bool,
) -> Result<SortedBlock> {
    sort_rows(&mut block, order, parallel);
    if spill {
        let (file, rows) = SpillFile::write(&block, order)?;
        block.clear();
        return Ok((Run::Disk { file, rows }, block));
    }
    let counts = merge_duplicates(&mut block, order);
    block.shrink_to_fit();
    Ok((Run::Memory { words: block, counts }, Vec::new()))
}

/// Sorts the rows (each `order` ids) of `block` lexicographically, with rayon
/// when `parallel`.
fn sort_rows(block: &mut [u32], order: usize, parallel: bool) {
    macro_rules! fixed_width {
        ($($width:literal)*) => {
            match order {
                $($width => sort_fixed_rows::<$width>(block, parallel),)*
                _ => sort_rows_any_width(block, order, parallel),
            }
        };
    }
    fixed_width!(1 2 3 4 5 6 7 8);
}

/// [`sort_rows`] for rows of a width known at compile time: sorting arrays in
/// place compares inline, several times faster than sorting through a permutation.
fn sort_fixed_rows<const WIDTH: usize>(block: &mut [u32], parallel: bool) {
    let (rows, rest) = block.as_chunks_mut::<WIDTH>();
    debug_assert!(rest.is_empty(), "a block holds whole rows");
    if parallel {
        rows.par_sort_unstable();
    } else {
        rows.sort_unstable();
    }
}

/// [`sort_rows`] for orders without a fixed-width specialisation.
fn sort_rows_any_width(block: &mut [u32], order: usize, parallel: bool) {
    let rows = block.len() / order;
    let mut permutation: Vec<usize> = (0..rows).collect();
    let compare = |&a: &usize, &b: &usize| {
        block[a * order..(a + 1) * order].cmp(&block[b * order..(b + 1) * order])
    };
    if parallel {
        permutation.par_sort_unstable_by(compare);
    } else {
        permutation.sort_unstable_by(compare);
    }
    let sorted: Vec<u32> = permutation
        .iter()
        .flat_map(|&row| block[row * order..(row + 1) * order].iter().copied())
        .collect();
    block.copy_from_slice(&sorted);
}

/// Collapses equal adjacent rows of the sorted `block` in place, leaving each
/// distinct row once, and returns their numbers of copies.
fn merge_duplicates(block: &mut Vec<u32>, order: usize) -> Vec<u64> {
    let counts: Vec<u64> = distinct_rows(block, order).map(|(_, count)| count).collect();
    let mut source = 0;
    for (kept, &count) in counts.iter().enumerate() {
        block.copy_within(source * order..(source + 1) * order, kept * order);
        source += count as usize;
    }
    block.truncate(counts.len() * order);
    counts
}

/// The distinct rows of a sorted block, each with its number of copies.
fn distinct_rows(block: &[u32], order: usize) -> impl Iterator<Item = (&[u32], u64)> {
    let mut rows = block.chunks_exact(order).peekable();
    std::iter::from_fn(move || {
        let row = rows.next()?;
        let mut count = 1;
        while rows.next_if(|&next| next == row).is_some() {
            count += 1;
        }
        Some((row, count))
    })
}

/// Rows read at a time from a spilled run during the merge.
const MERGE_CHUNK_ROWS: usize = 1 << 14;

/// A cursor over one run during the merge: the rows in hand and, for a spilled
/// run, the rest of its file, read a chunk at a time.
struct RunCursor {
    words: Vec<u32>,
    counts: Vec<u64>,
    next: usize,
    disk: Option<RunOnDisk>,
}

/// The unread part of a spilled run.
struct RunOnDisk {
    reader: File,
    rows_left: usize,
    bytes: Vec<u8>,
    file: SpillFile,
}

impl RunCursor {
    /// A cursor before the first row; a spilled run's first chunk is read by the
    /// first [`RunCursor::next`].
    fn new(run: Run) -> Result<Self> {
        Ok(match run {
            Run::Memory { words, counts } => RunCursor {
                words,
                counts,
                next: 0,
                disk: None,
            },
            Run::Disk { file, rows } => {
                let reader = File::open(&file.path).map_err(|e| Error::io(&file.path, e))?;
                RunCursor {
                    words: Vec::new(),
                    counts: Vec::new(),
                    next: 0,
                    disk: Some(RunOnDisk {
                        reader,
                        rows_left: rows,
                        bytes: Vec::new(),
                        file,
                    }),
                }
            }
        })
    }

    /// Writes the next row into `row` and returns its count, or `None` at the end.
    fn next(&mut self, row: &mut [u32]) -> Result<Option<u64>> {
        let order = row.len();
        if self.next == self.counts.len() {
            self.refill(order)?;
            if self.counts.is_empty() {
                return Ok(None);
            }
        }
        row.copy_from_slice(&self.words[self.next * order..(self.next + 1) * order]);
        self.next += 1;
        Ok(Some(self.counts[self.next - 1]))
    }

    /// Replaces the rows in hand by the next chunk of the file (none at its end).
    fn refill(&mut self, order: usize) -> Result<()> {
        self.words.clear();
        self.counts.clear();
        self.next = 0;
        let Some(disk) = self.disk.as_mut() else {
            return Ok(());
        };
        let rows = disk.rows_left.min(MERGE_CHUNK_ROWS);
        let width = order * 4 + 8;
        disk.bytes.resize(rows * width, 0);
        disk.reader
            .read_exact(&mut disk.bytes)
            .map_err(|e| Error::io(&disk.file.path, e))?;
        disk.rows_left -= rows;
        for record in disk.bytes.chunks_exact(width) {
            let (ids, count) = record.split_at(order * 4);
            self.words.extend(
                ids.chunks_exact(4)
                    .map(|id| u32::from_le_bytes(id.try_into().expect("4 bytes"))),
            );
            self.counts
                .push(u64::from_le_bytes(count.try_into().expect("8 bytes")));
        }
        Ok(())
    }
}

/// k-way merge of sorted runs, summing the counts of equal rows.
fn merge_runs(runs: Vec<Run>, order: usize) -> Result<(Vec<u32>, Vec<u64>)> {
    let mut cursors = Vec::with_capacity(runs.len());
    for run in runs {
        cursors.push(RunCursor::new(run)?);
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
    // The smallest row is taken from the top and replaced there by its run's next
    // row: one sift per row instead of a pop and a push.
    while let Some(mut top) = heap.peek_mut() {
        let Reverse((row, count, index)) = &mut *top;
        match counts.last_mut() {
            Some(last) if words[words.len() - order..] == row[..] => *last += *count,
            _ => {
                words.extend_from_slice(row);
                counts.push(*count);
            }
        }
        match cursors[*index].next(row)? {
            Some(next_count) => *count = next_count,
            None => {
                PeekMut::pop(top);
            }
        }
    }
    Ok((words, counts))
}

/// A temporary file holding one sorted run; removed when dropped.
struct SpillFile {
    path: PathBuf,
}

impl SpillFile {
    /// Writes the distinct rows of a sorted block as a run: per row, `order`
    /// little-endian u32 ids then a u64 count. Returns the file and its rows.
    fn write(block: &[u32], order: usize) -> Result<(Self, usize)> {
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
        let mut rows = 0;
        let written: std::io::Result<()> = (|| {
            for (row, count) in distinct_rows(block, order) {
                for id in row {
                    out.write_all(&id.to_le_bytes())?;
                }
                out.write_all(&count.to_le_bytes())?;
                rows += 1;
            }
            out.flush()
        })();
        written.map_err(|e| Error::io(&file.path, e))?;
        Ok((file, rows))
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

    /// Lines of three words, the i-th made of `i` modulo each of `moduli`.
    fn cycling_text(lines: usize, moduli: [usize; 3]) -> String {
        (0..lines)
            .map(|i| format!("w{} x{} y{}\n", i % moduli[0], i % moduli[1], i % moduli[2]))
            .collect()
    }

    #[test]
    fn spilled_runs_merge_to_the_same_counts() {
        // Budget 1 byte: blocks of 1,024 rows, a dozen runs. Budget 1 MiB: blocks of
        // about 18,700 order-4 rows, most of them distinct in the second text, so
        // each run is read back in more than one chunk.
        for (text, budget) in [
            (cycling_text(3000, [37, 11, 5]), 1),
            (cycling_text(40_000, [1009, 1013, 17]), 1 << 20),
        ] {
            let (in_memory, _) = count(&text, 4, None);
            let (spilled, _) = count(&text, 4, Some(budget));
            assert_eq!(in_memory.words, spilled.words);
            assert_eq!(in_memory.counts, spilled.counts);
        }
        let (wide, _) = count(&cycling_text(40_000, [1009, 1013, 17]), 4, None);
        assert!(wide.len() > 2 * MERGE_CHUNK_ROWS);
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
