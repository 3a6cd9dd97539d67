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

/// The predictions of the positions [`windows`] scores, in order, by windows of at most
/// `context` tokens every `stride` tokens, `batch` windows of one shape per call.
pub fn rolling_predictions(
    scorer: &dyn WindowScorer,
    sequence: &[u32],
    context: usize,
    stride: usize,
    batch: usize,
) -> Result<Vec<Prediction>> {
    let plan = windows(sequence.len(), context, stride)?;
    let mut predictions = Vec::with_capacity(sequence.len().saturating_sub(1));
    let mut pending: Vec<(&[u32], usize)> = Vec::new();
    let flush = |pending: &mut Vec<(&[u32], usize)>, out: &mut Vec<Prediction>| -> Result<()> {
        if pending.is_empty() {
            return Ok(());
        }
        for rows in scorer.score_windows(pending)? {
            out.extend(rows);
        }
        pending.clear();
        Ok(())
    };
    for window in plan {
        let ids = &sequence[window.start..window.end];
        let from = window.scored_from - window.start;
        // A batch holds windows of one shape, so that they stack into one tensor.
        let same_shape = pending
            .first()
            .is_none_or(|(first, first_from)| first.len() == ids.len() && *first_from == from);
        if !same_shape || pending.len() >= batch.max(1) {
            flush(&mut pending, &mut predictions)?;
        }
        pending.push((ids, from));
    }
    flush(&mut pending, &mut predictions)?;
    Ok(predictions)
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
        let context: Vec<f32> = rolling_predictions(&ContextLength, &[0; 10], 4, 2, 3)
            .unwrap()
            .iter()
            .map(|p| -p.logprob)
            .collect();
        assert_eq!(context, [1.0, 2.0, 3.0, 2.0, 3.0, 2.0, 3.0, 2.0, 3.0]);
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
