//! The sliding-window plan for texts longer than a model's context.
//!
//! It is the strided recipe of the `transformers` perplexity guide, which lm-eval's
//! rolling log-likelihood also follows: windows of at most `context` tokens start every
//! `stride` tokens; each window scores only the tokens that no earlier window scored.
//! With `stride < context` every token after the first is scored exactly once, with
//! `context - stride` tokens of overlap as extra conditioning. The first token of a
//! window has nothing before it in the window and is never scored; a model with a
//! beginning-of-sequence token puts that token first in the sequence. With
//! `stride == context` the windows are non-overlapping chunks, each scored on its own,
//! so the first token of every chunk only conditions.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

use super::{Prediction, WindowScorer};
use crate::{Error, Result};

/// One forward pass: the tokens `start..end` of the sequence, of which positions
/// `scored_from..end` are scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// First token of the window.
    pub start: usize,
    /// One past the last token of the window.
    pub end: usize,
    /// First scored position (absolute); always after `start`.
    pub scored_from: usize,
}

/// The windows over a sequence of `len` tokens: with `stride < context` they score every
/// position `1..len`; with `stride == context`, every position but the chunk starts.
pub fn windows(len: usize, context: usize, stride: usize) -> Result<Vec<Window>> {
    if context < 2 {
        return Err(Error::Invalid(format!(
            "--context {context}: a window needs at least 2 tokens (one to condition on, one to score)"
        )));
    }
    if stride == 0 || stride > context {
        return Err(Error::Invalid(format!(
            "--stride {stride}: the stride must be between 1 and the context ({context})"
        )));
    }
    let mut plan = Vec::new();
    let mut scored_to = 1; // position 0 is never scored
    let mut start = 0;
    while scored_to < len {
        let end = (start + context).min(len);
        let scored_from = scored_to.max(start + 1);
        if end > scored_from {
            plan.push(Window {
                start,
                end,
                scored_from,
            });
            scored_to = end;
        }
        start += stride;
    }
    Ok(plan)
}

/// One window's token ids and its first scored position within them, as
/// [`WindowScorer::score_windows`] takes them.
type WindowIds<'a> = (&'a [u32], usize);

/// The predictions of the positions [`windows`] scores in each sequence, in order, by
/// windows of at most `context` tokens every `stride` tokens, `batch` windows of one
/// shape per call.
///
/// Windows are independent of each other, so with several threads in the pool each
/// thread scores whole batches on its own (see [`score_batches`]).
pub fn rolling_predictions(
    scorer: &(dyn WindowScorer + Sync),
    sequences: &[Vec<u32>],
    context: usize,
    stride: usize,
    batch: usize,
) -> Result<Vec<Vec<Prediction>>> {
    // (sequence, windows of one shape) in the order their predictions come.
    let mut batches: Vec<(usize, Vec<WindowIds>)> = Vec::new();
    for (index, sequence) in sequences.iter().enumerate() {
        for window in windows(sequence.len(), context, stride)? {
            let ids = &sequence[window.start..window.end];
            let from = window.scored_from - window.start;
            // A batch holds windows of one shape, so that they stack into one tensor.
            let joins_last = batches.last().is_some_and(|(last, pending)| {
                let (first, first_from) = pending[0];
                *last == index && pending.len() < batch.max(1) && first.len() == ids.len() && first_from == from
            });
            match batches.last_mut() {
                Some((_, pending)) if joins_last => pending.push((ids, from)),
                _ => batches.push((index, vec![(ids, from)])),
            }
        }
    }
    let windows: Vec<&[WindowIds]> = batches.iter().map(|(_, pending)| pending.as_slice()).collect();
    let mut predictions = vec![Vec::new(); sequences.len()];
    for ((index, _), rows) in batches.iter().zip(score_batches(scorer, &windows)?) {
        predictions[*index].extend(rows);
    }
    Ok(predictions)
}

/// Each batch's predictions, in order. With one thread in the current pool, or one
/// batch, the batches run one after another and every kernel may split its work over
/// the pool. Otherwise as many workers as the pool has threads take the next batch in
/// turn, each in a pool of one thread of its own, so that a batch's products and
/// kernels run serially: two windows on two cores keep each core on whole products,
/// where one window on both splits every product in two and waits at the end of each.
fn score_batches(scorer: &(dyn WindowScorer + Sync), batches: &[&[WindowIds]]) -> Result<Vec<Vec<Prediction>>> {
    let score = |windows: &[WindowIds]| -> Result<Vec<Prediction>> {
        Ok(scorer.score_windows(windows)?.into_iter().flatten().collect())
    };
    let workers = rayon::current_num_threads().min(batches.len());
    if workers <= 1 {
        return batches.iter().map(|windows| score(windows)).collect();
    }
    let next = AtomicUsize::new(0);
    let scored: Vec<Mutex<Option<Result<Vec<Prediction>>>>> = batches.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|scope| -> Result<()> {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                scope.spawn(|| -> Result<()> {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(1)
                        .stack_size(8 << 20)
                        .build()
                        .map_err(|err| Error::Invalid(format!("cannot start a scoring thread: {err}")))?;
                    pool.install(|| loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(windows) = batches.get(i) else { break };
                        let rows = score(windows);
                        let failed = rows.is_err();
                        *scored[i].lock().unwrap_or_else(PoisonError::into_inner) = Some(rows);
                        if failed {
                            // Later batches are not needed once one has failed.
                            next.store(batches.len(), Ordering::Relaxed);
                        }
                    });
                    Ok(())
                })
            })
            .collect();
        for handle in handles {
            handle
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))?;
        }
        Ok(())
    })?;
    // The first batch without a result follows a failed one, whose error comes first.
    scored
        .into_iter()
        .map(|slot| slot.into_inner().unwrap_or_else(PoisonError::into_inner))
        .map_while(|rows| rows)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scores position i of a window as -(number of tokens before it in the window),
    /// so a test can see how much context every prediction had.
    struct ContextLength;

    impl WindowScorer for ContextLength {
        fn score_windows(&self, windows: &[(&[u32], usize)]) -> Result<Vec<Vec<Prediction>>> {
            Ok(windows
                .iter()
                .map(|(ids, from)| {
                    (*from..ids.len())
                        .map(|i| Prediction {
                            logprob: -(i as f32),
                            top_logprob: 0.0,
                            top_id: ids[i],
                            target: ids[i],
                        })
                        .collect()
                })
                .collect())
        }
    }

    #[test]
    fn with_overlap_every_position_after_the_first_is_scored_once() {
        for (len, context, stride) in [(10, 4, 2), (11, 5, 3), (3, 8, 7), (9, 3, 1)] {
            let plan = windows(len, context, stride).unwrap();
            let scored: Vec<usize> = plan.iter().flat_map(|w| w.scored_from..w.end).collect();
            assert_eq!(
                scored,
                (1..len).collect::<Vec<_>>(),
                "{len} {context} {stride}"
            );
            assert!(plan
                .iter()
                .all(|w| w.end - w.start <= context && w.scored_from > w.start));
        }
    }

    #[test]
    fn the_strided_recipe_keeps_context_minus_stride_tokens_of_overlap() {
        // transformers' guide: begin in range(0, 10, 2), end = min(begin + 4, 10),
        // trg_len = end - prev_end; the loop stops once end reaches the length.
        let plan = windows(10, 4, 2).unwrap();
        let expected = [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)];
        let got: Vec<_> = plan
            .iter()
            .map(|w| (w.start, w.end, w.scored_from))
            .collect();
        assert_eq!(got, expected);
        let context: Vec<f32> = rolling_predictions(&ContextLength, &[vec![0; 10]], 4, 2, 3)
            .unwrap()[0]
            .iter()
            .map(|p| -p.logprob)
            .collect();
        assert_eq!(context, [1.0, 2.0, 3.0, 2.0, 3.0, 2.0, 3.0, 2.0, 3.0]);
    }

    /// Fails on any window that holds an id of `bad` or more, and records how many
    /// threads the pool it ran on had.
    struct FailsOn {
        bad: u32,
        pool_threads: Mutex<Vec<usize>>,
    }

    impl WindowScorer for FailsOn {
        fn score_windows(&self, windows: &[(&[u32], usize)]) -> Result<Vec<Vec<Prediction>>> {
            self.pool_threads.lock().unwrap().push(rayon::current_num_threads());
            match windows.iter().find(|(ids, _)| ids.iter().any(|&id| id >= self.bad)) {
                Some((ids, _)) => Err(Error::Invalid(format!("window from {}", ids[0]))),
                None => ContextLength.score_windows(windows),
            }
        }
    }

    fn pool(threads: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap()
    }

    #[test]
    fn windows_scored_on_several_threads_come_back_in_order() {
        // Distinct ids, so that each prediction's target says where it came from.
        let sequences: Vec<Vec<u32>> = [23, 2, 9, 40, 1, 17]
            .iter()
            .scan(0u32, |next, &len| {
                *next += len;
                Some((*next - len..*next).collect())
            })
            .collect();
        for batch in [1, 2, 5] {
            let scorer = FailsOn { bad: u32::MAX, pool_threads: Mutex::new(Vec::new()) };
            let rows = pool(3).install(|| rolling_predictions(&scorer, &sequences, 6, 4, batch)).unwrap();
            assert_eq!(rows.len(), sequences.len());
            for (sequence, rows) in sequences.iter().zip(&rows) {
                let targets: Vec<u32> = rows.iter().map(|p| p.target).collect();
                assert_eq!(targets, sequence.get(1..).unwrap_or_default(), "batch {batch}");
                // Each position conditions on the tokens its own window holds before it.
                for (window, predictions) in windows(sequence.len(), 6, 4)
                    .unwrap()
                    .iter()
                    .zip(rows.chunk_by(|a, b| a.logprob > b.logprob))
                {
                    let context: Vec<f32> = predictions.iter().map(|p| -p.logprob).collect();
                    let expected: Vec<f32> =
                        (window.scored_from - window.start..window.end - window.start).map(|i| i as f32).collect();
                    assert_eq!(context, expected, "batch {batch}");
                }
            }
            // Several batches: every one ran alone, in a pool of one thread.
            assert!(scorer.pool_threads.lock().unwrap().iter().all(|&threads| threads == 1));
        }
        // One batch keeps the whole pool for its kernels.
        let scorer = FailsOn { bad: u32::MAX, pool_threads: Mutex::new(Vec::new()) };
        pool(3).install(|| rolling_predictions(&scorer, &sequences[..1], 30, 30, 1)).unwrap();
        assert_eq!(*scorer.pool_threads.lock().unwrap(), [3]);
    }

    #[test]
    fn the_first_failing_window_is_the_error_reported() {
        let sequences = vec![(0..40).collect::<Vec<u32>>()];
        for threads in [1, 2] {
            let scorer = FailsOn { bad: 21, pool_threads: Mutex::new(Vec::new()) };
            let err = pool(threads)
                .install(|| rolling_predictions(&scorer, &sequences, 4, 4, 1))
                .unwrap_err();
            // Windows start every 4 tokens; those from 20 on fail, and the first is reported.
            assert_eq!(err.to_string(), Error::Invalid("window from 20".into()).to_string());
        }
    }

    #[test]
    fn stride_equal_to_context_is_non_overlapping_chunks() {
        let plan = windows(10, 4, 4).unwrap();
        let got: Vec<_> = plan
            .iter()
            .map(|w| (w.start, w.end, w.scored_from))
            .collect();
        assert_eq!(got, [(0, 4, 1), (4, 8, 5), (8, 10, 9)]);
    }

    #[test]
    fn bad_context_and_stride_are_refused() {
        assert!(windows(10, 1, 1).is_err());
        assert!(windows(10, 4, 0).is_err());
        assert!(windows(10, 4, 5).is_err());
        assert!(windows(1, 4, 4).unwrap().is_empty());
    }
}
