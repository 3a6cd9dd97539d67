//! Diverse beam search (Vijayakumar et al. 2016, "Diverse Beam Search: Decoding Diverse
//! Solutions from Neural Sequence Models"), as `transformers`' group beam search.
//!
//! The beams are split into `groups` groups of `num_beams / groups`. At each step the
//! groups extend one after another; group g's scores are lowered by `diversity_penalty`
//! times the number of beams of groups 0..g that chose the same token at this step (the
//! Hamming diversity term). Each group is otherwise an ordinary beam search with its own
//! finished hypotheses; the result is every group's hypotheses, best first.
//!
//! All groups' beams are scored by one `next_logprobs` call and advanced by one
//! `advance_batch` call per step.

use super::beam::{select, top_candidates, Beam, BeamSettings, Hypotheses};
use super::stop::FinishReason;
use super::{DecodeSettings, Generation};
use crate::lm::LanguageModel;
use crate::{Error, Result};

/// The knobs of diverse beam search.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DiverseBeamSettings {
    /// Beams in all, length penalty, early stopping, sequences returned.
    pub beam: BeamSettings,
    /// Number of groups; must divide `beam.num_beams`.
    pub groups: usize,
    /// Subtracted from a token's score once per earlier-group beam that chose it.
    pub diversity_penalty: f32,
}

/// Diverse beam search from `prompt`: the `num_return` best hypotheses over all groups.
pub fn diverse_beam_search<M: LanguageModel>(
    model: &M,
    prompt: &[u32],
    diverse: &DiverseBeamSettings,
    settings: &DecodeSettings,
) -> Result<Vec<Generation>> {
    let beam = &diverse.beam;
    beam.validate()?;
    if diverse.groups == 0 || !beam.num_beams.is_multiple_of(diverse.groups) {
        return Err(Error::Invalid(format!(
            "the number of beams ({}) must be a multiple of the number of groups ({})",
            beam.num_beams, diverse.groups
        )));
    }
    if !(diverse.diversity_penalty.is_finite() && diverse.diversity_penalty >= 0.0) {
        return Err(Error::Invalid("the diversity penalty must be >= 0".into()));
    }
    let width = beam.num_beams / diverse.groups;
    let max_new = settings.stop.max_new_tokens;
    if max_new == 0 {
        return Ok(vec![Generation {
            tokens: Vec::new(),
            logprobs: Vec::new(),
            score: 0.0,
            finish: FinishReason::Length,
        }]);
    }
    let start = Beam {
        state: model.prefill(prompt)?,
        tokens: prompt.to_vec(),
        logprobs: Vec::new(),
        score: 0.0,
    };
    let mut groups: Vec<Vec<Beam<M::State>>> = vec![vec![start]; diverse.groups];
    let mut hyps: Vec<Hypotheses> = (0..diverse.groups)
        .map(|_| Hypotheses::new(width, beam.length_penalty, beam.early_stopping))
        .collect();
    let mut done = vec![false; diverse.groups];
    let vocab = model.vocab_size();
    for step in 0..max_new {
        // One call for the beams of every group still searching.
        let states: Vec<M::State> = groups
            .iter()
            .zip(&done)
            .filter(|(_, &d)| !d)
            .flat_map(|(g, _)| g.iter().map(|b| b.state.clone()))
            .collect();
        let mut raw_rows = model.next_logprobs(&states)?.into_iter();
        drop(states);
        let mut chosen = vec![0u32; vocab];
        let mut kept_per_group = Vec::with_capacity(diverse.groups);
        for (g, beams) in groups.iter().enumerate() {
            if done[g] {
                kept_per_group.push(Vec::new());
                continue;
            }
            let raw: Vec<Vec<f32>> = raw_rows.by_ref().take(beams.len()).collect();
            let rows: Vec<Vec<f32>> = beams
                .iter()
                .zip(&raw)
                .map(|(b, row)| {
                    let mut logits = settings.process(&b.tokens, prompt.len(), row);
                    for (l, &count) in logits.iter_mut().zip(&chosen) {
                        *l -= diverse.diversity_penalty * count as f32;
                    }
                    logits
                })
                .collect();
            let base: Vec<f32> = beams.iter().map(|b| b.score).collect();
            let candidates = top_candidates(&rows, &raw, &base, 2 * width);
            let kept = select(beams, &candidates, width, prompt.len(), settings, &mut hyps[g]);
            for c in &kept {
                if let Some(count) = chosen.get_mut(c.token as usize) {
                    *count += 1;
                }
            }
            kept_per_group.push(kept);
        }
        if step + 1 == max_new {
            break;
        }
        // One batched advance for every group's kept beams.
        let mut states = Vec::new();
        let mut tokens = Vec::new();
        for (beams, kept) in groups.iter().zip(&kept_per_group) {
            for c in kept {
                states.push(beams[c.parent].state.clone());
                tokens.push(c.token);
            }
        }
        model.advance_batch(&mut states, &tokens)?;
        let mut states = states.into_iter();
        for (g, kept) in kept_per_group.iter().enumerate() {
            if done[g] {
                continue;
            }
            if kept.is_empty() {
                done[g] = true;
                groups[g].clear();
                continue;
            }
            let next: Vec<Beam<M::State>> = kept
                .iter()
                .zip(states.by_ref())
                .map(|(c, state)| {
                    let parent = &groups[g][c.parent];
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
                .collect();
            groups[g] = next;
            if hyps[g].is_done(kept[0].score, step + 1, max_new) {
                done[g] = true;
            }
        }
        if done.iter().all(|&d| d) {
            break;
        }
    }
    let mut out: Vec<Generation> = hyps.into_iter().flat_map(Hypotheses::into_sorted).collect();
    out.sort_by(|a, b| b.score.total_cmp(&a.score));
    if out.is_empty() {
        return Err(Error::Invalid(
            "diverse beam search finished no hypothesis: every token was filtered out".into(),
        ));
    }
    out.truncate(beam.num_return);
    Ok(out)
}
