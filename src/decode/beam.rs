//! Beam search as `transformers` runs it, so that the same weights give the same beams.
//!
//! Each beam carries the cumulative sum of its processed log-probabilities. A step
//! scores every (beam, token) extension, keeps the best 2 × `num_beams` candidates
//! (enough that `num_beams` survive even if all the others end), and walks them best
//! first: a candidate that ends its sequence (EOS or a stop string) becomes a finished
//! hypothesis if it ranks among the first `num_beams`, with score
//! `sum_logprobs / generated_len ^ length_penalty` (generated tokens, EOS included);
//! the others continue until `num_beams` beams run. At `max_new_tokens` the running
//! beams are finished the same way. The search stops early once `num_beams` hypotheses
//! are finished and, with `EarlyStopping::Heuristic` (`early_stopping=False`), the best
//! running beam could no longer beat the worst of them at its current length. The
//! result is the finished hypotheses, best first.
//!
//! All beams are scored by one `next_logprobs` call and advanced by one `advance_batch`
//! call per step, so a transformer runs each step as a single batched forward pass.

use super::stop::FinishReason;
use super::{DecodeSettings, Generation};
use crate::lm::LanguageModel;
use crate::{Error, Result};

/// When beam search may stop before `max_new_tokens` (`transformers`' `early_stopping`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EarlyStopping {
    /// `True`: as soon as `num_beams` hypotheses are finished.
    Eager,
    /// `False`: when the best running beam, scored at its current length, cannot beat
    /// the worst finished hypothesis.
    #[default]
    Heuristic,
    /// `"never"`: only when no better hypothesis is possible (the canonical beam search).
    Never,
}

/// The knobs of beam search.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BeamSettings {
    /// Beams kept per step.
    pub num_beams: usize,
    /// Exponent of the length normalisation: > 0 favours longer sequences.
    pub length_penalty: f32,
    /// When to stop before the token budget.
    pub early_stopping: EarlyStopping,
    /// How many finished hypotheses to return (at most `num_beams`).
    pub num_return: usize,
}

impl Default for BeamSettings {
    fn default() -> Self {
        BeamSettings {
            num_beams: 4,
            length_penalty: 1.0,
            early_stopping: EarlyStopping::Heuristic,
            num_return: 1,
        }
    }
}

impl BeamSettings {
    pub(crate) fn validate(&self) -> Result<()> {
        if self.num_beams == 0 {
            return Err(Error::Invalid("the number of beams must be at least 1".into()));
        }
        if self.num_return == 0 || self.num_return > self.num_beams {
            return Err(Error::Invalid(format!(
                "can return between 1 and {} (the number of beams) sequences, not {}",
                self.num_beams, self.num_return
            )));
        }
        if !self.length_penalty.is_finite() {
            return Err(Error::Invalid("the length penalty must be a finite number".into()));
        }
        Ok(())
    }
}

/// A running beam: its state, the generated tokens and their log-probabilities.
#[derive(Clone)]
pub(crate) struct Beam<S> {
    pub state: S,
    /// Prompt and generated tokens.
    pub tokens: Vec<u32>,
    pub logprobs: Vec<f32>,
    /// Sum of processed log-probabilities.
    pub score: f32,
}

/// An extension of beam `parent` by `token`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Candidate {
    pub parent: usize,
    pub token: u32,
    pub score: f32,
    pub logprob: f32,
}

/// The finished hypotheses of one beam group: the best `width`, by normalised score.
pub(crate) struct Hypotheses {
    width: usize,
    length_penalty: f32,
    early_stopping: EarlyStopping,
    pub list: Vec<Generation>,
}

impl Hypotheses {
    pub fn new(width: usize, length_penalty: f32, early_stopping: EarlyStopping) -> Self {
        Hypotheses {
            width,
            length_penalty,
            early_stopping,
            list: Vec::new(),
        }
    }

    fn normalise(&self, score: f32, len: usize) -> f32 {
        (score as f64 / (len.max(1) as f64).powf(self.length_penalty as f64)) as f32
    }

    fn worst(&self) -> f32 {
        self.list.iter().map(|g| g.score).fold(f32::INFINITY, f32::min)
    }

    /// Adds a finished sequence if it is among the best `width`.
    pub fn add(&mut self, tokens: Vec<u32>, logprobs: Vec<f32>, score: f32, finish: FinishReason) {
        let score = self.normalise(score, tokens.len());
        if self.list.len() < self.width || score > self.worst() {
            self.list.push(Generation {
                tokens,
                logprobs,
                score,
                finish,
            });
            if self.list.len() > self.width {
                let worst = self
                    .list
                    .iter()
                    .enumerate()
                    .min_by(|a, b| a.1.score.total_cmp(&b.1.score))
                    .map(|(i, _)| i)
                    .expect("the list is not empty");
                self.list.remove(worst);
            }
        }
    }

    /// Whether no running beam can improve the hypotheses any more (`transformers`'
    /// `is_done`). `best_running` is the best running score, `generated` its length.
    pub fn is_done(&self, best_running: f32, generated: usize, max_new_tokens: usize) -> bool {
        if self.list.len() < self.width {
            return false;
        }
        let length = match self.early_stopping {
            EarlyStopping::Eager => return true,
            EarlyStopping::Heuristic => generated,
            EarlyStopping::Never if self.length_penalty > 0.0 => max_new_tokens,
            EarlyStopping::Never => generated,
        };
        self.worst() >= self.normalise(best_running, length)
    }

    /// The hypotheses, best first (ties: the earlier finished).
    pub fn into_sorted(mut self) -> Vec<Generation> {
        self.list.sort_by(|a, b| b.score.total_cmp(&a.score));
        self.list
    }
}

/// The best `count` extensions of `beams` under processed scores `rows`, best first
/// (ties: lower beam, then lower id).
pub(crate) fn top_candidates(rows: &[Vec<f32>], raw: &[Vec<f32>], base: &[f32], count: usize) -> Vec<Candidate> {
    let mut all: Vec<Candidate> = Vec::new();
    for (parent, (row, raw)) in rows.iter().zip(raw).enumerate() {
        for (token, &l) in row.iter().enumerate() {
            if l == f32::NEG_INFINITY || l.is_nan() {
                continue;
            }
            all.push(Candidate {
                parent,
                token: token as u32,
                score: base[parent] + l,
                logprob: raw[token],
            });
        }
    }
    let order = |a: &Candidate, b: &Candidate| {
        b.score
            .total_cmp(&a.score)
            .then(a.parent.cmp(&b.parent))
            .then(a.token.cmp(&b.token))
    };
    if all.len() > count && count > 0 {
        all.select_nth_unstable_by(count - 1, order);
        all.truncate(count);
    }
    all.sort_by(order);
    all
}

/// One group's step: walks `candidates` best first, finishing those that end (if among
/// the first `width`) and keeping `width` to continue. Returns (parent, token, score,
/// logprob) of the continuing beams; at the last step they are finished too.
pub(crate) fn select<S: Clone>(
    beams: &[Beam<S>],
    candidates: &[Candidate],
    width: usize,
    prompt_len: usize,
    settings: &DecodeSettings,
    hyps: &mut Hypotheses,
) -> Vec<Candidate> {
    let mut keep = Vec::with_capacity(width);
    for (rank, cand) in candidates.iter().enumerate() {
        let parent = &beams[cand.parent];
        let mut tokens = parent.tokens[prompt_len..].to_vec();
        tokens.push(cand.token);
        match settings.stop.check(&tokens) {
            Some(finish @ (FinishReason::Eos | FinishReason::Stop)) => {
                if rank < width {
                    let mut logprobs = parent.logprobs.clone();
                    logprobs.push(cand.logprob);
                    hyps.add(tokens, logprobs, cand.score, finish);
                }
            }
            Some(FinishReason::Length) => {
                let mut logprobs = parent.logprobs.clone();
                logprobs.push(cand.logprob);
                hyps.add(tokens, logprobs, cand.score, FinishReason::Length);
                keep.push(*cand);
            }
            None => keep.push(*cand),
        }
        if keep.len() == width {
            break;
        }
    }
    keep
}

/// Builds the next beams from the kept candidates, advancing all states in one batch.
pub(crate) fn advance_beams<M: LanguageModel>(
    model: &M,
    beams: &[Beam<M::State>],
    kept: &[Candidate],
) -> Result<Vec<Beam<M::State>>> {
    let mut states: Vec<M::State> = kept.iter().map(|c| beams[c.parent].state.clone()).collect();
    let tokens: Vec<u32> = kept.iter().map(|c| c.token).collect();
    model.advance_batch(&mut states, &tokens)?;
    Ok(kept
        .iter()
        .zip(states)
        .map(|(c, state)| {
            let parent = &beams[c.parent];
            let mut tokens = parent.tokens.clone();
            tokens.push(c.token);
            let mut logprobs = parent.logprobs.clone();
            logprobs.push(c.logprob);
            Beam {
                state,
                tokens,
                logprobs,
                score: c.score,
            }
        })
        .collect())
}

/// Beam search from `prompt`: the `beam.num_return` best finished hypotheses, best first.
/// `settings.processors` rewrite each beam's log-probabilities (as `transformers`
/// processes `log_softmax` scores); `settings.choice` is not used.
pub fn beam_search<M: LanguageModel>(
    model: &M,
    prompt: &[u32],
    beam: &BeamSettings,
    settings: &DecodeSettings,
) -> Result<Vec<Generation>> {
    beam.validate()?;
    let max_new = settings.stop.max_new_tokens;
    let mut hyps = Hypotheses::new(beam.num_beams, beam.length_penalty, beam.early_stopping);
    // All beams start as the prompt; the copies would only tie, so start with one
    // (`transformers` gives the copies -1e9).
    let mut beams = vec![Beam {
        state: model.prefill(prompt)?,
        tokens: prompt.to_vec(),
        logprobs: Vec::new(),
        score: 0.0,
    }];
    if max_new == 0 {
        return Ok(vec![Generation {
            tokens: Vec::new(),
            logprobs: Vec::new(),
            score: 0.0,
            finish: FinishReason::Length,
        }]);
    }
    for step in 0..max_new {
        let states: Vec<M::State> = beams.iter().map(|b| b.state.clone()).collect();
        let raw = model.next_logprobs(&states)?;
        drop(states);
        let rows: Vec<Vec<f32>> = beams
            .iter()
            .zip(&raw)
            .map(|(b, row)| settings.process(&b.tokens, prompt.len(), row))
            .collect();
        let base: Vec<f32> = beams.iter().map(|b| b.score).collect();
        let candidates = top_candidates(&rows, &raw, &base, 2 * beam.num_beams);
        let kept = select(&beams, &candidates, beam.num_beams, prompt.len(), settings, &mut hyps);
        if kept.is_empty() || step + 1 == max_new {
            break;
        }
        let best_running = kept[0].score;
        beams = advance_beams(model, &beams, &kept)?;
        if hyps.is_done(best_running, step + 1, max_new) {
            break;
        }
    }
    let mut out = hyps.into_sorted();
    if out.is_empty() {
        return Err(Error::Invalid(
            "beam search finished no hypothesis: every token was filtered out".into(),
        ));
    }
    out.truncate(beam.num_return);
    Ok(out)
}
