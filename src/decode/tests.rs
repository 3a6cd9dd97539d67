//! Decoding tests: greedy and beam search against `transformers` on the tiny Llama
//! fixture (`shared/fixtures/hf_tiny_llama`, see its README), and the laws every
//! strategy must obey, on n-gram models small enough to enumerate.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use super::*;
use crate::rng::SplitMix64;
use crate::lm::LanguageModel;
use crate::model::Transformer;
use crate::ngram::{self, NgramModel, Smoothing, TrainOptions};

fn fixture_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/fixtures/hf_tiny_llama"))
}

fn fixture_model() -> Transformer {
    Transformer::from_pretrained(&fixture_dir(), &Device::Cpu, DType::F32).unwrap()
}

fn generate_refs() -> serde_json::Value {
    let text = std::fs::read_to_string(fixture_dir().join("reference.json")).unwrap();
    let value: serde_json::Value = serde_json::from_str(&text).unwrap();
    value["generate"].clone()
}

fn json_ids(value: &serde_json::Value) -> Vec<u32> {
    value.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect()
}

/// The fixture's characters, in id order.
fn fixture_chars() -> Vec<char> {
    let text = std::fs::read_to_string(fixture_dir().join("vocab.json")).unwrap();
    let chars: Vec<String> = serde_json::from_str(&text).unwrap();
    chars.iter().map(|s| s.chars().next().unwrap()).collect()
}

fn encode_chars(text: &str) -> Vec<u32> {
    let chars = fixture_chars();
    text.chars()
        .map(|c| chars.iter().position(|&x| x == c).unwrap() as u32)
        .collect()
}

fn decode_chars(ids: &[u32]) -> String {
    let chars = fixture_chars();
    ids.iter().map(|&id| chars[id as usize]).collect()
}

/// An add-one bigram model over the fixture's 65 character ids: a cheap second model
/// with the transformer's vocabulary (an amateur, a draft).
struct CharBigram {
    logprobs: Vec<Vec<f32>>,
}

impl CharBigram {
    fn new(text: &str, vocab: usize) -> Self {
        let ids = encode_chars(text);
        let mut counts = vec![vec![1.0f64; vocab]; vocab + 1];
        let mut previous = vocab; // the start row
        for id in ids {
            counts[previous][id as usize] += 1.0;
            previous = id as usize;
        }
        let logprobs = counts
            .iter()
            .map(|row| {
                let total: f64 = row.iter().sum();
                row.iter().map(|c| (c / total).ln() as f32).collect()
            })
            .collect();
        CharBigram { logprobs }
    }
}

impl LanguageModel for CharBigram {
    type State = usize;
    fn vocab_size(&self) -> usize {
        self.logprobs[0].len()
    }
    fn initial_state(&self) -> usize {
        self.vocab_size()
    }
    fn advance(&self, state: &mut usize, token: u32) -> crate::Result<()> {
        *state = token as usize;
        Ok(())
    }
    fn next_logprobs(&self, states: &[usize]) -> crate::Result<Vec<Vec<f32>>> {
        Ok(states.iter().map(|&s| self.logprobs[s].clone()).collect())
    }
}

/// A model that gives every token the same probability.
struct Uniform(usize);

impl LanguageModel for Uniform {
    type State = ();
    fn vocab_size(&self) -> usize {
        self.0
    }
    fn initial_state(&self) {}
    fn advance(&self, _: &mut (), _: u32) -> crate::Result<()> {
        Ok(())
    }
    fn next_logprobs(&self, states: &[()]) -> crate::Result<Vec<Vec<f32>>> {
        Ok(states.iter().map(|_| vec![-(self.0 as f32).ln(); self.0]).collect())
    }
}

/// A model that puts 0.9 on one token and spreads the rest evenly.
struct Peaked {
    vocab: usize,
    token: u32,
}

impl LanguageModel for Peaked {
    type State = ();
    fn vocab_size(&self) -> usize {
        self.vocab
    }
    fn initial_state(&self) {}
    fn advance(&self, _: &mut (), _: u32) -> crate::Result<()> {
        Ok(())
    }
    fn next_logprobs(&self, states: &[()]) -> crate::Result<Vec<Vec<f32>>> {
        let rest = (0.1 / (self.vocab - 1) as f32).ln();
        let mut row = vec![rest; self.vocab];
        row[self.token as usize] = 0.9f32.ln();
        Ok(states.iter().map(|_| row.clone()).collect())
    }
}

fn shakespeare_lines(n: usize) -> String {
    let path = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data/tinyshakespeare.txt"));
    let text = std::fs::read_to_string(path).unwrap();
    text.lines().take(n).collect::<Vec<_>>().join("\n")
}

fn train(text: &str, order: usize, smoothing: Smoothing) -> NgramModel {
    let opts = TrainOptions {
        order,
        smoothing,
        ..TrainOptions::default()
    };
    let trained = ngram::train_reader(text.as_bytes(), Path::new("train.txt"), &opts).unwrap();
    NgramModel::from_arpa(&trained.model).unwrap()
}

fn shakespeare_ngram() -> NgramModel {
    train(&shakespeare_lines(3000), 3, Smoothing::ModifiedKneserNey)
}

/// Word ids of a whitespace-split text.
fn words(model: &NgramModel, text: &str) -> Vec<u32> {
    text.split_whitespace().map(|w| model.word_id(w).unwrap()).collect()
}

/// A corpus over five words, for models small enough to enumerate.
const TINY: &str = "a b c\na a b\nb c d\nc d e\nd e a\ne a b c\na c e\nb d\nc a\ne e d\n";

// --- against transformers -------------------------------------------------------

#[test]
fn greedy_matches_transformers() {
    let model = fixture_model();
    let refs = generate_refs();
    for i in 0..3 {
        let prompt = json_ids(&refs[format!("prompt_{i}")]);
        let expected = json_ids(&refs[format!("greedy_{i}")]);
        let out = generate(&model, &prompt, &DecodeSettings::greedy(32), 1).unwrap();
        let mut full = prompt.clone();
        full.extend(&out[0].tokens);
        assert_eq!(full, expected, "greedy_{i}");
        assert_eq!(out[0].finish, FinishReason::Length);
    }
}

#[test]
fn beam4_matches_transformers() {
    let model = fixture_model();
    let refs = generate_refs();
    let beam = BeamSettings {
        num_beams: 4,
        length_penalty: 1.0,
        early_stopping: EarlyStopping::Heuristic,
        num_return: 1,
    };
    for i in 0..3 {
        let prompt = json_ids(&refs[format!("prompt_{i}")]);
        let expected = json_ids(&refs[format!("beam4_{i}")]);
        let out = beam_search(&model, &prompt, &beam, &DecodeSettings::greedy(24)).unwrap();
        let mut full = prompt.clone();
        full.extend(&out[0].tokens);
        assert_eq!(full, expected, "beam4_{i}");
        // The score is the length-normalised sum of log-probabilities.
        let mean = out[0].logprob() / 24.0;
        assert!((out[0].score - mean).abs() < 1e-4, "{} vs {mean}", out[0].score);
    }
}

#[test]
fn speculative_greedy_is_the_transformers_greedy_output() {
    let model = fixture_model();
    let draft = CharBigram::new(&shakespeare_lines(400), model.vocab_size());
    let refs = generate_refs();
    for i in 0..3 {
        let prompt = json_ids(&refs[format!("prompt_{i}")]);
        let expected = json_ids(&refs[format!("greedy_{i}")]);
        for k in [1, 4] {
            let out = speculative(&model, &draft, &prompt, k, &DecodeSettings::greedy(32), 1).unwrap();
            let mut full = prompt.clone();
            full.extend(&out[0].generation.tokens);
            assert_eq!(full, expected, "prompt {i}, k = {k}");
            assert!(out[0].stats.rounds <= 32);
        }
    }
}

#[test]
fn transformer_samples_are_seeded_and_batch_independent() {
    let model = fixture_model();
    let prompt = encode_chars("ROMEO:\n");
    let settings = DecodeSettings::sampling(12, 7);
    let batch = generate(&model, &prompt, &settings, 3).unwrap();
    let again = generate(&model, &prompt, &settings, 3).unwrap();
    assert_eq!(batch, again, "same seed, same samples");
    let alone = generate(&model, &prompt, &settings, 1).unwrap();
    assert_eq!(alone[0].tokens, batch[0].tokens, "sample 0 does not depend on the batch");
    let other = generate(&model, &prompt, &DecodeSettings::sampling(12, 8), 1).unwrap();
    assert_ne!(other[0].tokens, alone[0].tokens, "another seed, another sample");
    // The reported log-probabilities are the model's.
    let mut full = prompt.clone();
    full.extend(&batch[1].tokens);
    let scored = model.score(&full).unwrap();
    for (ours, theirs) in batch[1].logprobs.iter().zip(&scored[prompt.len()..]) {
        assert!((ours - theirs).abs() < 1e-4);
    }
}

#[test]
fn banned_and_forced_phrases_on_the_transformer() {
    let model = fixture_model();
    let prompt = encode_chars("ROMEO:\n");
    // Unconstrained greedy text says "the" again and again.
    let plain = generate(&model, &prompt, &DecodeSettings::greedy(40), 1).unwrap();
    assert!(decode_chars(&plain[0].tokens).contains("the"));
    let mut settings = DecodeSettings::greedy(40);
    settings.processors.push(BannedPhrases(vec![encode_chars("the"), encode_chars("and")]));
    let banned = generate(&model, &prompt, &settings, 1).unwrap();
    let text = decode_chars(&banned[0].tokens);
    assert!(!text.contains("the") && !text.contains("and"), "{text:?}");

    let mut settings = DecodeSettings::sampling(30, 3);
    settings.processors.push(ForcedPhrases {
        phrases: vec![encode_chars("crown"), encode_chars("Verona")],
        eos: None,
    });
    for sample in generate(&model, &prompt, &settings, 4).unwrap() {
        let text = decode_chars(&sample.tokens);
        assert!(text.contains("crown") && text.contains("Verona"), "{text:?}");
        assert_eq!(sample.tokens.len(), 30);
    }
}

#[test]
fn beam_family_on_the_transformer() {
    let model = fixture_model();
    let prompt = encode_chars("KING");
    let settings = DecodeSettings::greedy(16);
    let beam = BeamSettings {
        num_beams: 4,
        num_return: 4,
        ..BeamSettings::default()
    };
    let beams = beam_search(&model, &prompt, &beam, &settings).unwrap();
    assert_eq!(beams.len(), 4);
    assert!(beams.windows(2).all(|w| w[0].score >= w[1].score), "best first");

    // One group and no penalty is plain beam search.
    let one = DiverseBeamSettings {
        beam,
        groups: 1,
        diversity_penalty: 0.0,
    };
    assert_eq!(diverse_beam_search(&model, &prompt, &one, &settings).unwrap(), beams);
    // Four groups with a strong penalty start with four different tokens.
    let diverse = DiverseBeamSettings {
        beam,
        groups: 4,
        diversity_penalty: 100.0,
    };
    let out = diverse_beam_search(&model, &prompt, &diverse, &settings).unwrap();
    assert_eq!(out.len(), 4);
    let mut firsts: Vec<u32> = out.iter().map(|g| g.tokens[0]).collect();
    firsts.sort();
    firsts.dedup();
    assert_eq!(firsts.len(), 4, "groups diverge at the first token");

    let sampled = stochastic_beam_search(&model, &prompt, 4, &DecodeSettings::sampling(16, 1)).unwrap();
    assert_eq!(sampled.len(), 4);
    for i in 0..4 {
        for j in i + 1..4 {
            assert_ne!(sampled[i].tokens, sampled[j].tokens, "without replacement");
        }
    }
    assert!(sampled.windows(2).all(|w| w[0].score >= w[1].score));
    let again = stochastic_beam_search(&model, &prompt, 4, &DecodeSettings::sampling(16, 1)).unwrap();
    assert_eq!(sampled, again);
}

#[test]
fn contrastive_against_a_uniform_amateur_is_the_experts_greedy_output() {
    let model = fixture_model();
    let prompt = encode_chars("ROMEO:\n");
    let greedy = generate(&model, &prompt, &DecodeSettings::greedy(20), 1).unwrap();
    let cs = ContrastiveSettings {
        alpha: 0.1,
        amateur_temperature: 1.0,
    };
    let out = contrastive(&model, &Uniform(65), &prompt, &cs, &DecodeSettings::greedy(20), 1).unwrap();
    assert_eq!(out[0].tokens, greedy[0].tokens);
    // A real amateur changes the choice, but never leaves the plausible set.
    let amateur = CharBigram::new(&shakespeare_lines(400), 65);
    let out = contrastive(&model, &amateur, &prompt, &cs, &DecodeSettings::greedy(20), 1).unwrap();
    let mut full = prompt.clone();
    for (&token, &logprob) in out[0].tokens.iter().zip(&out[0].logprobs) {
        let row = model.next_logprobs(&[model.prefill(&full).unwrap()]).unwrap().remove(0);
        let best = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        assert!(logprob >= best + 0.1f32.ln() - 1e-5);
        full.push(token);
    }
    assert!(contrastive(&model, &Uniform(64), &prompt, &cs, &DecodeSettings::greedy(2), 1).is_err());
}

// --- laws on n-gram models -----------------------------------------------------

#[test]
fn identity_knobs_are_ancestral_sampling_and_top_k_1_is_greedy() {
    let model = shakespeare_ngram();
    let prompt = words(&model, "First Citizen:");
    let plain = generate(&model, &prompt, &DecodeSettings::sampling(15, 11), 3).unwrap();
    let params = SamplingParams {
        temperature: Some(1.0),
        top_k: Some(model.vocab_size()),
        top_p: Some(1.0),
        ..SamplingParams::default()
    };
    let mut settings = DecodeSettings::sampling(15, 11);
    settings.processors = ProcessorChain::sampling(&params).unwrap();
    // Keep a no-op TopK in the chain, so the identity is tested and not skipped.
    settings.processors.push(processors::TopK(model.vocab_size()));
    let knobs = generate(&model, &prompt, &settings, 3).unwrap();
    assert_eq!(
        plain.iter().map(|g| &g.tokens).collect::<Vec<_>>(),
        knobs.iter().map(|g| &g.tokens).collect::<Vec<_>>()
    );

    let greedy = generate(&model, &prompt, &DecodeSettings::greedy(15), 1).unwrap();
    let mut settings = DecodeSettings::sampling(15, 5);
    settings.processors = ProcessorChain::sampling(&SamplingParams {
        top_k: Some(1),
        ..SamplingParams::default()
    })
    .unwrap();
    for sample in generate(&model, &prompt, &settings, 3).unwrap() {
        assert_eq!(sample.tokens, greedy[0].tokens);
    }
}

#[test]
fn processors_keep_a_distribution_and_top_p_keeps_the_nucleus() {
    let model = shakespeare_ngram();
    let context = words(&model, "the");
    let state = model.prefill(&context).unwrap();
    let row = model.next_logprobs(&[state]).unwrap().remove(0);
    let ctx = StepContext {
        tokens: &context,
        prompt_len: context.len(),
        max_new_tokens: 10,
    };
    let chains: Vec<(&str, ProcessorChain)> = vec![
        ("temperature", ProcessorChain::new().with(processors::Temperature(0.7))),
        ("top-k", ProcessorChain::new().with(processors::TopK(10))),
        ("top-p", ProcessorChain::new().with(processors::TopP(0.9))),
        ("epsilon", ProcessorChain::new().with(processors::Epsilon(0.01))),
        ("min-p", ProcessorChain::new().with(processors::MinP(0.1))),
        ("typical", ProcessorChain::new().with(processors::Typical(0.5))),
        ("repetition", ProcessorChain::new().with(processors::RepetitionPenalty(1.3))),
        ("epsilon 0.99", ProcessorChain::new().with(processors::Epsilon(0.99))),
        ("all", ProcessorChain::sampling(&SamplingParams {
            temperature: Some(1.5),
            top_k: Some(50),
            top_p: Some(0.8),
            epsilon: Some(0.001),
            min_p: Some(0.05),
            typical: Some(0.9),
            repetition_penalty: Some(1.2),
        })
        .unwrap()),
    ];
    for (name, chain) in chains {
        let mut logits = row.clone();
        chain.apply(&ctx, &mut logits);
        let probs = processors::softmax(&logits);
        let total: f64 = probs.iter().sum();
        assert!((total - 1.0).abs() < 1e-9, "{name}: sums to {total}");
        assert!(probs.iter().all(|p| (0.0..=1.0).contains(p)), "{name}");
        assert!(logits.iter().any(|l| l.is_finite()), "{name} keeps a token");
    }

    // The nucleus: the kept tokens are the most likely ones, reach p, and are minimal.
    let p = 0.8;
    let mut logits = row.clone();
    processors::TopP(p).process(&ctx, &mut logits);
    let probs = processors::softmax(&row);
    let kept: Vec<usize> = (0..row.len()).filter(|&i| logits[i].is_finite()).collect();
    let kept_mass: f64 = kept.iter().map(|&i| probs[i]).sum();
    let smallest = kept.iter().map(|&i| probs[i]).fold(1.0, f64::min);
    assert!(kept_mass >= p as f64 - 1e-6);
    assert!(kept_mass - smallest < p as f64, "minimal");
    assert!((0..row.len()).all(|i| kept.contains(&i) || probs[i] <= smallest));
    let mut rng = SplitMix64::new(1);
    for _ in 0..2000 {
        let token = sampler::sample(&logits, &mut rng).unwrap();
        assert!(kept.contains(&(token as usize)), "sampled outside the nucleus");
    }
}

#[test]
fn top_p_sampling_stays_in_the_nucleus_along_a_sequence() {
    let model = shakespeare_ngram();
    let prompt = words(&model, "MENENIUS:");
    let mut settings = DecodeSettings::sampling(20, 2);
    settings.processors = ProcessorChain::sampling(&SamplingParams {
        top_p: Some(0.5),
        ..SamplingParams::default()
    })
    .unwrap();
    for sample in generate(&model, &prompt, &settings, 5).unwrap() {
        let mut context = prompt.clone();
        for &token in &sample.tokens {
            let row = model.next_logprobs(&[model.prefill(&context).unwrap()]).unwrap().remove(0);
            let mut logits = row.clone();
            let ctx = StepContext {
                tokens: &context,
                prompt_len: prompt.len(),
                max_new_tokens: 20,
            };
            processors::TopP(0.5).process(&ctx, &mut logits);
            assert!(logits[token as usize].is_finite());
            context.push(token);
        }
    }
}

/// Exact probabilities of every sequence of `len` tokens (none of them `<s>`).
fn enumerate<M: LanguageModel>(model: &M, prompt: &[u32], len: usize) -> HashMap<Vec<u32>, f64> {
    let mut out = HashMap::new();
    let mut frontier = vec![(Vec::new(), 0.0f64)];
    for _ in 0..len {
        let mut next = Vec::new();
        for (seq, logp) in frontier {
            let mut context = prompt.to_vec();
            context.extend(&seq);
            let row = model.next_logprobs(&[model.prefill(&context).unwrap()]).unwrap().remove(0);
            let probs = processors::softmax(&row);
            for (token, &p) in probs.iter().enumerate() {
                if p > 0.0 {
                    let mut s: Vec<u32> = seq.clone();
                    s.push(token as u32);
                    next.push((s, logp + p.ln()));
                }
            }
        }
        frontier = next;
    }
    for (seq, logp) in frontier {
        out.insert(seq, logp.exp());
    }
    out
}

fn total_variation(exact: &HashMap<Vec<u32>, f64>, samples: &[Vec<u32>]) -> f64 {
    let mut counts: HashMap<&Vec<u32>, f64> = HashMap::new();
    for s in samples {
        *counts.entry(s).or_insert(0.0) += 1.0;
    }
    let n = samples.len() as f64;
    let mut tv = 0.0;
    for (seq, &p) in exact {
        tv += (p - counts.get(seq).copied().unwrap_or(0.0) / n).abs();
    }
    for (seq, &c) in &counts {
        if !exact.contains_key(*seq) {
            tv += c / n;
        }
    }
    tv / 2.0
}

#[test]
fn speculative_sampling_follows_the_target_distribution() {
    let target = train(TINY, 3, Smoothing::ModifiedKneserNey);
    let draft = train(TINY, 1, Smoothing::AddK);
    let prompt = words(&target, "a");
    let exact = enumerate(&target, &prompt, 3);
    let draft_exact = enumerate(&draft, &prompt, 3);
    let n = 20_000;
    let settings = DecodeSettings::sampling(3, 42);
    let spec: Vec<Vec<u32>> = speculative(&target, &draft, &prompt, 2, &settings, n)
        .unwrap()
        .into_iter()
        .map(|r| r.generation.tokens)
        .collect();
    let plain: Vec<Vec<u32>> = generate(&target, &prompt, &settings, n)
        .unwrap()
        .into_iter()
        .map(|g| g.tokens)
        .collect();
    let tv_spec = total_variation(&exact, &spec);
    let tv_plain = total_variation(&exact, &plain);
    let tv_draft = total_variation(&draft_exact, &spec);
    // With ~400 outcomes and 20000 draws, sampling noise alone gives a TV near 0.05.
    assert!(tv_spec < 0.06, "speculative TV {tv_spec} (ancestral {tv_plain})");
    assert!(tv_plain < 0.06, "ancestral TV {tv_plain}");
    assert!(tv_draft > 0.15, "the draft differs from the target ({tv_draft}), so the test has teeth");

    // Chi-square on the first token alone (vocab of 8, 7 degrees of freedom).
    let mut first = vec![0.0f64; target.vocab_size()];
    for s in &spec {
        first[s[0] as usize] += 1.0;
    }
    let row = target.next_logprobs(&[target.prefill(&prompt).unwrap()]).unwrap().remove(0);
    let chi2: f64 = processors::softmax(&row)
        .iter()
        .zip(&first)
        .filter(|(&p, _)| p > 0.0)
        .map(|(&p, &o)| (o - p * n as f64).powi(2) / (p * n as f64))
        .sum();
    assert!(chi2 < 24.3, "chi-square {chi2} beyond the 0.001 level of 7 dof");
}

#[test]
fn speculative_greedy_equals_target_greedy_on_ngrams() {
    let target = shakespeare_ngram();
    let draft = train(&shakespeare_lines(3000), 2, Smoothing::AddK);
    let mut settings = DecodeSettings::greedy(30);
    settings.processors.push(processors::RepetitionPenalty(1.5));
    for prompt in ["First Citizen:", "MENENIUS:", "the"] {
        let prompt = words(&target, prompt);
        let greedy = generate(&target, &prompt, &settings, 1).unwrap();
        for k in [1, 3, 6] {
            let spec = speculative(&target, &draft, &prompt, k, &settings, 1).unwrap();
            assert_eq!(spec[0].generation.tokens, greedy[0].tokens, "k = {k}");
        }
    }
}

#[test]
fn seeds_stop_conditions_and_eos() {
    let model = shakespeare_ngram();
    let prompt = words(&model, "First Citizen:");
    let eos = model.eos_id().unwrap();
    let mut settings = DecodeSettings::sampling(200, 9);
    settings.stop.eos = Some(eos);
    let a = generate(&model, &prompt, &settings, 4).unwrap();
    assert_eq!(a, generate(&model, &prompt, &settings, 4).unwrap());
    for g in &a {
        match g.finish {
            FinishReason::Eos => assert_eq!(g.tokens.last(), Some(&eos)),
            FinishReason::Length => assert_eq!(g.tokens.len(), 200),
            FinishReason::Stop => panic!("no stop strings"),
        }
        assert!(!g.tokens[..g.tokens.len() - 1].contains(&eos));
    }
    // Stop strings end the text as soon as it contains one.
    let detok_model = shakespeare_ngram();
    let detokenize: Detokenizer = std::sync::Arc::new(move |ids: &[u32]| {
        ids.iter()
            .map(|&id| detok_model.word(id).unwrap_or("").to_string())
            .collect::<Vec<_>>()
            .join(" ")
    });
    let mut settings = DecodeSettings::sampling(100, 1);
    settings.processors.push(BannedTokens(vec![eos]));
    settings.stop.stop_strings = vec!["the".into()];
    settings.stop.detokenize = Some(detokenize.clone());
    let out = generate(&model, &prompt, &settings, 1).unwrap();
    let text = detokenize(&out[0].tokens);
    assert_eq!(out[0].finish, FinishReason::Stop, "{text}");
    assert!(text.contains("the"));
    assert!(!detokenize(&out[0].tokens[..out[0].tokens.len() - 1]).contains("the"));
}

#[test]
fn beam_with_eos_and_length_penalty_on_ngrams() {
    let model = shakespeare_ngram();
    let prompt = words(&model, "MENENIUS:");
    let eos = model.eos_id().unwrap();
    let mut settings = DecodeSettings::greedy(20);
    settings.stop.eos = Some(eos);
    for lp in [0.0, 1.0, 2.0] {
        let beam = BeamSettings {
            num_beams: 5,
            length_penalty: lp,
            early_stopping: EarlyStopping::Heuristic,
            num_return: 3,
        };
        let out = beam_search(&model, &prompt, &beam, &settings).unwrap();
        assert_eq!(out.len(), 3);
        for g in &out {
            let expected = g.logprobs.iter().sum::<f32>() / (g.tokens.len() as f32).powf(lp);
            assert!((g.score - expected).abs() < 1e-3, "score is sum / len^lp");
            assert!(g.finish == FinishReason::Eos || g.tokens.len() == 20);
        }
    }
    // Beam search with one beam is greedy search.
    let beam = BeamSettings {
        num_beams: 1,
        ..BeamSettings::default()
    };
    let one = beam_search(&model, &prompt, &beam, &DecodeSettings::greedy(20)).unwrap();
    let greedy = generate(&model, &prompt, &DecodeSettings::greedy(20), 1).unwrap();
    assert_eq!(one[0].tokens, greedy[0].tokens);
}

#[test]
fn stochastic_beam_with_one_beam_samples_the_model() {
    // k = 1 Gumbel-top-k is an ancestral sample: check its distribution exactly.
    let model = train(TINY, 2, Smoothing::ModifiedKneserNey);
    let prompt = words(&model, "b");
    let exact = enumerate(&model, &prompt, 2);
    let samples: Vec<Vec<u32>> = (0..6000)
        .map(|seed| {
            stochastic_beam_search(&model, &prompt, 1, &DecodeSettings::sampling(2, seed))
                .unwrap()
                .remove(0)
                .tokens
        })
        .collect();
    let tv = total_variation(&exact, &samples);
    assert!(tv < 0.05, "TV {tv}");
    // k = all sequences: every one of them, each once.
    let all = stochastic_beam_search(&model, &prompt, exact.len(), &DecodeSettings::sampling(2, 3)).unwrap();
    let mut seqs: Vec<Vec<u32>> = all.iter().map(|g| g.tokens.clone()).collect();
    seqs.sort();
    seqs.dedup();
    assert_eq!(seqs.len(), exact.len());
}

#[test]
fn mbr_picks_the_consensus() {
    assert!((chrf("the cat sat", "the cat sat") - 1.0).abs() < 1e-12);
    assert_eq!(chrf("abc", "xyz"), 0.0);
    assert!(chrf("the cat sat", "the cat sit") > chrf("the cat sat", "a dog ran"));
    let items: Vec<&[u32]> = vec![&[1, 2, 3, 4], &[1, 2, 3, 5], &[9, 9, 9], &[1, 2, 3, 4]];
    let (best, utilities) = mbr::mbr_select(&items, &|a: &&[u32], b: &&[u32]| ngram_f_score(a, b, 4, 1.0));
    assert_eq!(best, 0, "{utilities:?}");
    assert!(utilities[2] < utilities[1]);

    let model = shakespeare_ngram();
    let prompt = words(&model, "MENENIUS:");
    let settings = DecodeSettings::sampling(12, 4);
    let result = mbr(&model, &prompt, 8, None, &settings, &|a, b| ngram_f_score(a, b, 4, 1.0)).unwrap();
    assert_eq!(result.candidates.len(), 8);
    let best = result.expected_utility[result.best];
    assert!(result.expected_utility.iter().all(|&u| u <= best));
    let again = mbr(&model, &prompt, 8, None, &settings, &|a, b| ngram_f_score(a, b, 4, 1.0)).unwrap();
    assert_eq!(again.chosen(), result.chosen());
}

#[test]
fn allowed_tokens_and_bad_settings() {
    let model = shakespeare_ngram();
    let prompt = words(&model, "the");
    let allowed = words(&model, "the of and you");
    let mut settings = DecodeSettings::sampling(25, 1);
    settings.processors.push(AllowedTokens(allowed.clone()));
    for g in generate(&model, &prompt, &settings, 3).unwrap() {
        assert!(g.tokens.iter().all(|t| allowed.contains(t)));
    }
    let mut settings = DecodeSettings::greedy(5);
    settings.processors.push(AllowedTokens(Vec::new()));
    let err = generate(&model, &prompt, &settings, 1).unwrap_err().to_string();
    assert!(err.contains("filtered out"), "{err}");
    assert!(ProcessorChain::sampling(&SamplingParams {
        temperature: Some(0.0),
        ..SamplingParams::default()
    })
    .is_err());
    assert!(ProcessorChain::sampling(&SamplingParams {
        top_p: Some(1.5),
        ..SamplingParams::default()
    })
    .is_err());
    assert!(generate(&model, &[model.vocab_size() as u32], &DecodeSettings::greedy(3), 1).is_err());
    let no_repeat = ProcessorChain::new().with(NoRepeatNgram(2));
    let mut settings = DecodeSettings::greedy(40);
    settings.processors = no_repeat;
    let g = generate(&model, &prompt, &settings, 1).unwrap().remove(0);
    let mut all = prompt.clone();
    all.extend(&g.tokens);
    let mut pairs: Vec<&[u32]> = all.windows(2).collect();
    let n = pairs.len();
    pairs.sort();
    pairs.dedup();
    assert_eq!(pairs.len(), n, "no bigram twice");
}

// --- hand-worked distributions ----------------------------------------------------

/// The row every hand-worked case starts from: p = (0.5, 0.2, 0.15, 0.1, 0.05).
fn hand_row() -> Vec<f32> {
    [0.5f32, 0.2, 0.15, 0.1, 0.05].iter().map(|p| p.ln()).collect()
}

fn processed(processor: &dyn LogitsProcessor, tokens: &[u32]) -> Vec<f64> {
    let mut logits = hand_row();
    let ctx = StepContext {
        tokens,
        prompt_len: 0,
        max_new_tokens: 10,
    };
    processor.process(&ctx, &mut logits);
    processors::softmax(&logits)
}

fn assert_probs(name: &str, got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{name}");
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() < 1e-6, "{name}: got {got:?}, want {want:?}");
    }
}

#[test]
fn each_processor_gives_the_hand_worked_distribution() {
    // Temperature 2: p^(1/2) renormalised (sqrt 0.5, sqrt 0.2, ... over their sum 2.0813).
    assert_probs(
        "temperature 2",
        &processed(&processors::Temperature(2.0), &[]),
        &[0.339_717_8, 0.214_856_4, 0.186_071_1, 0.151_926_4, 0.107_428_2],
    );
    // Top-2: 0.5 and 0.2 over 0.7.
    assert_probs("top-k 2", &processed(&processors::TopK(2), &[]), &[5.0 / 7.0, 2.0 / 7.0, 0.0, 0.0, 0.0]);
    // Top-p 0.8: 0.5 (0.5 < 0.8), 0.2 (0.7 < 0.8), 0.15 crosses 0.8 and is kept: /0.85.
    let nucleus = [0.5 / 0.85, 0.2 / 0.85, 0.15 / 0.85, 0.0, 0.0];
    assert_probs("top-p 0.8", &processed(&processors::TopP(0.8), &[]), &nucleus);
    // Top-p 0.65: 0.5 is short of it, 0.5 + 0.2 reaches it: two tokens.
    assert_probs("top-p 0.65", &processed(&processors::TopP(0.65), &[]), &[5.0 / 7.0, 2.0 / 7.0, 0.0, 0.0, 0.0]);
    // Min-p 0.25: threshold 0.25 × 0.5 = 0.125 keeps 0.5, 0.2, 0.15.
    assert_probs("min-p 0.25", &processed(&processors::MinP(0.25), &[]), &nucleus);
    // Epsilon 0.12 drops 0.1 and 0.05.
    assert_probs("epsilon 0.12", &processed(&processors::Epsilon(0.12), &[]), &nucleus);
    // Typical 0.8: entropy H = 1.33307 nats; |−ln p − H| = 0.640, 0.276, 0.564, 0.970,
    // 1.663, so tokens enter in the order 1, 2, 0 (mass 0.2, 0.35, 0.85 ≥ 0.8): {0, 1, 2}.
    assert_probs("typical 0.8", &processed(&processors::Typical(0.8), &[]), &nucleus);
    // Repetition penalty 2 on the seen token 1: ln 0.2 × 2 = ln 0.04; the rest renormalise
    // over 0.84.
    assert_probs(
        "repetition penalty 2",
        &processed(&processors::RepetitionPenalty(2.0), &[1, 1]),
        &[0.5 / 0.84, 0.04 / 0.84, 0.15 / 0.84, 0.1 / 0.84, 0.05 / 0.84],
    );
    // Logit bias ln 4 on token 4: 0.05 × 4 = 0.2, over 1.15.
    assert_probs(
        "logit bias",
        &processed(&LogitBias(vec![(4, 4f32.ln())]), &[]),
        &[0.5 / 1.15, 0.2 / 1.15, 0.15 / 1.15, 0.1 / 1.15, 0.2 / 1.15],
    );
    // No repeated bigram: after "3 0 ... 3", token 0 would repeat the bigram (3, 0).
    assert_probs(
        "no-repeat-ngram 2",
        &processed(&NoRepeatNgram(2), &[3, 0, 2, 3]),
        &[0.0, 0.2 / 0.5, 0.15 / 0.5, 0.1 / 0.5, 0.05 / 0.5],
    );
    // A banned phrase (2, 1): after 2, token 1 is removed.
    assert_probs(
        "banned phrase",
        &processed(&BannedPhrases(vec![vec![2, 1]]), &[0, 2]),
        &[0.5 / 0.8, 0.0, 0.15 / 0.8, 0.1 / 0.8, 0.05 / 0.8],
    );
}

#[test]
fn the_processor_order_is_configurable_and_matters() {
    let default: Vec<Stage> = Stage::DEFAULT_ORDER.iter().map(|(s, _)| *s).collect();
    assert_eq!(Stage::parse_order(&Stage::DEFAULT_ORDER.map(|(_, n)| n).join(",")).unwrap(), default);
    assert!(Stage::parse_order("top-k,bogus").unwrap_err().to_string().contains("bogus"));
    assert!(Stage::parse_order("top-k,top-k").is_err());
    let params = SamplingParams {
        temperature: Some(0.25),
        top_p: Some(0.6),
        ..SamplingParams::default()
    };
    // A set knob missing from the order is an error, not silently dropped.
    assert!(ProcessorChain::sampling_in_order(&params, &[Stage::Temperature]).is_err());
    let ctx = StepContext {
        tokens: &[],
        prompt_len: 0,
        max_new_tokens: 1,
    };
    let kept = |order: &[Stage]| {
        let chain = ProcessorChain::sampling_in_order(&params, order).unwrap();
        let mut logits = hand_row();
        chain.apply(&ctx, &mut logits);
        logits.iter().filter(|l| l.is_finite()).count()
    };
    // Top-p 0.6 first keeps 0.5 and 0.2 (the mass before 0.2 is 0.5 < 0.6).
    assert_eq!(kept(&[Stage::TopP, Stage::Temperature]), 2);
    // Temperature 0.25 first makes p ∝ p⁴: 0.0625 / 0.0665 = 0.94 ≥ 0.6 alone.
    assert_eq!(kept(&[Stage::Temperature, Stage::TopP]), 1);
}

/// Pearson's chi-square statistic of `counts` against `probs` (cells with p > 0).
fn chi_square(counts: &[usize], probs: &[f64]) -> (f64, usize) {
    let n: usize = counts.iter().sum();
    let mut stat = 0.0;
    let mut cells = 0;
    for (&c, &p) in counts.iter().zip(probs) {
        if p > 0.0 {
            let expected = p * n as f64;
            stat += (c as f64 - expected).powi(2) / expected;
            cells += 1;
        } else {
            assert_eq!(c, 0, "a token of probability 0 was drawn");
        }
    }
    (stat, cells - 1)
}

#[test]
fn sampling_frequencies_match_the_processed_distribution() {
    // Temperature 2, then top-k 4: p ∝ sqrt(p) over the 4 best (worked as above).
    let chain = ProcessorChain::sampling(&SamplingParams {
        temperature: Some(2.0),
        top_k: Some(4),
        ..SamplingParams::default()
    })
    .unwrap();
    let ctx = StepContext {
        tokens: &[],
        prompt_len: 0,
        max_new_tokens: 1,
    };
    let mut logits = hand_row();
    chain.apply(&ctx, &mut logits);
    let sqrt: Vec<f64> = [0.5f64, 0.2, 0.15, 0.1].iter().map(|p| p.sqrt()).collect();
    let total: f64 = sqrt.iter().sum();
    let mut probs: Vec<f64> = sqrt.iter().map(|s| s / total).collect();
    probs.push(0.0);
    let mut counts = vec![0usize; 5];
    let mut rng = SplitMix64::new(2024);
    for _ in 0..20_000 {
        counts[sampler::sample(&logits, &mut rng).unwrap() as usize] += 1;
    }
    let (stat, dof) = chi_square(&counts, &probs);
    // The 0.1% critical value of chi-square with 3 degrees of freedom is 16.27.
    assert_eq!(dof, 3);
    assert!(stat < 16.27, "chi-square {stat} with counts {counts:?}");

    // The same law through `generate` on a model: the first token of many samples
    // follows the processed next-token distribution (top-p 0.9 after temperature 0.8).
    let model = train(TINY, 2, Smoothing::ModifiedKneserNey);
    let prompt = words(&model, "a");
    let mut settings = DecodeSettings::sampling(1, 99);
    settings.processors = ProcessorChain::sampling(&SamplingParams {
        temperature: Some(0.8),
        top_p: Some(0.9),
        ..SamplingParams::default()
    })
    .unwrap();
    let row = model.next_logprobs(&[model.prefill(&prompt).unwrap()]).unwrap().remove(0);
    let probs = processors::softmax(&settings.process(&prompt, prompt.len(), &row));
    let mut counts = vec![0usize; model.vocab_size()];
    for g in generate(&model, &prompt, &settings, 8000).unwrap() {
        counts[g.tokens[0] as usize] += 1;
    }
    let (stat, dof) = chi_square(&counts, &probs);
    // 0.1% critical values of chi-square: 1 → 10.83, ..., 6 → 22.46.
    let critical = [10.83, 13.82, 16.27, 18.47, 20.52, 22.46][dof - 1];
    assert!(stat < critical, "chi-square {stat} (dof {dof}) with counts {counts:?}");
}

#[test]
fn mbr_utilities_by_hand() {
    // ROUGE-1: 2 matching words of 3 and 4: P = 2/3, R = 1/2, F1 = 4/7.
    assert!((rouge1("the cat sat", "the cat is here") - 4.0 / 7.0).abs() < 1e-12);
    assert_eq!(rouge1("", ""), 1.0);
    assert!((sentence_bleu("a b c d", "a b c d") - 1.0).abs() < 1e-12);
    // "a b c e" vs "a b c d": unigrams 3/4; smoothed bigrams (2+1)/(3+1), trigrams
    // (1+1)/(2+1), 4-grams (0+1)/(1+1); equal lengths, no brevity penalty.
    let want = (0.75f64 * 0.75 * (2.0 / 3.0) * 0.5).powf(0.25);
    assert!((sentence_bleu("a b c e", "a b c d") - want).abs() < 1e-12);
    // Brevity: "a b" against "a b c d": exp(1 − 4/2) times the precisions
    // 1, (1+1)/(1+1), (0+1)/(0+1), (0+1)/(0+1).
    assert!((sentence_bleu("a b", "a b c d") - (-1.0f64).exp()).abs() < 1e-12);
    assert_eq!(sentence_bleu("x", "a b"), 0.0);
    assert_eq!(Utility::parse("bleu").unwrap(), Utility::Bleu);
    assert!(Utility::parse("meteor").is_err());

    // Hypotheses restricted to the most probable samples: the best is among them.
    let model = shakespeare_ngram();
    let prompt = words(&model, "MENENIUS:");
    let settings = DecodeSettings::sampling(10, 8);
    let utility = |a: &[u32], b: &[u32]| ngram_f_score(a, b, 2, 1.0);
    let result = mbr(&model, &prompt, 8, Some(3), &settings, &utility).unwrap();
    assert_eq!(result.hypotheses.len(), 3);
    assert!(result.hypotheses.contains(&result.best));
    let worst_kept = result.hypotheses.iter().map(|&i| result.candidates[i].logprob()).fold(f32::INFINITY, f32::min);
    for i in (0..8).filter(|i| !result.hypotheses.contains(i)) {
        assert!(result.candidates[i].logprob() <= worst_kept);
    }
}

#[test]
fn self_consistency_votes() {
    let pattern = regex::Regex::new(r"answer is (\d+)").unwrap();
    assert_eq!(extract_answer(&pattern, "the answer is 4, no, the answer is 5."), Some("5".into()));
    assert_eq!(extract_answer(&pattern, "no idea"), None);
    let whole = regex::Regex::new(r"\d+").unwrap();
    assert_eq!(extract_answer(&whole, "1 then 22"), Some("22".into()));
    let answers = [Some("7"), None, Some("5"), Some("7"), Some("5"), Some("9")]
        .map(|a| a.map(String::from));
    let tally = majority_vote(&answers);
    // 7 and 5 tie with two votes each; 7 appeared first.
    assert_eq!(
        tally,
        vec![
            Vote { answer: "7".into(), votes: 2, first: 0 },
            Vote { answer: "5".into(), votes: 2, first: 2 },
            Vote { answer: "9".into(), votes: 1, first: 5 },
        ]
    );
}

#[test]
fn discriminators_by_bayes_rule() {
    // Equal per-token likelihoods: 1/2; a discriminator twice as likely per token:
    // sigmoid(ln 2) = 2/3, whatever the length.
    assert!((attribute_probability(&[-1.0, -2.0], &[-1.0, -2.0]) - 0.5).abs() < 1e-12);
    let ln2 = 2f32.ln();
    let p = attribute_probability(&[-1.0 + ln2, -3.0 + ln2, -0.5 + ln2], &[-1.0, -3.0, -0.5]);
    assert!((p - 2.0 / 3.0).abs() < 1e-6, "{p}");
    assert_eq!(attribute_probability(&[], &[]), 0.5);

    // FUDGE with the generator as its own discriminator reweights by a constant 1/2:
    // over the whole vocabulary it is plain sampling, draw for draw.
    let model = shakespeare_ngram();
    let prompt = words(&model, "the");
    let settings = DecodeSettings::sampling(12, 3);
    let plain = generate(&model, &prompt, &settings, 4).unwrap();
    let fudged = fudge(&model, &model, &prompt, &settings, model.vocab_size(), 4).unwrap();
    for (p, f) in plain.iter().zip(&fudged) {
        assert_eq!(p.tokens, f.generation.tokens);
        assert!((f.attribute_probability - 0.5).abs() < 1e-9);
    }
    // FUDGE restricted to the top 1 candidate is greedy decoding.
    let greedy = generate(&model, &prompt, &DecodeSettings::greedy(12), 1).unwrap();
    let top1 = fudge(&model, &model, &prompt, &settings, 1, 1).unwrap();
    assert_eq!(top1[0].generation.tokens, greedy[0].tokens);

    // A discriminator that prefers token 3 steers FUDGE there from a uniform generator
    // (whose greedy choice would be token 0, the lowest id among ties).
    let uniform = Uniform(6);
    let peaked = Peaked { vocab: 6, token: 3 };
    let steered = fudge(&uniform, &peaked, &[], &DecodeSettings::greedy(4), 6, 1).unwrap();
    assert_eq!(steered[0].generation.tokens, vec![3, 3, 3, 3]);
    // sigmoid(ln 0.9 − ln(1/6)) = 5.4 / 6.4.
    assert!((steered[0].attribute_probability - 5.4 / 6.4).abs() < 1e-6);
    // Sample-and-discard keeps exactly the samples at or above the threshold.
    let kept = sample_and_discard(&model, &model, &prompt, &settings, 3, 0.49, 10).unwrap();
    assert_eq!(kept.kept.len(), 3);
    assert_eq!(kept.drawn, 3);
    let err = sample_and_discard(&model, &model, &prompt, &settings, 2, 0.51, 6).unwrap_err();
    assert!(err.to_string().contains("only 0 of 6 samples"), "{err}");
    let other = Uniform(model.vocab_size() + 1);
    assert!(fudge(&model, &other, &prompt, &settings, 5, 1).is_err());
}
