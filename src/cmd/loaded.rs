//! Opening a model for `generate`, `eval` and `lora`: a transformer directory
//! (config.json, model.safetensors, tokenizer.json) or an n-gram model file, together
//! with the way its text maps to token ids.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context as _, Result};
use candle_core::{DType, Tensor};

use super::Context;
use crate::decode::Detokenizer;
use crate::eval::{Prediction, WindowScorer};
use crate::lm::LanguageModel;
use crate::model::Transformer;
use crate::ngram::{self, NgramModel, SubwordNgram};
use crate::tokenize::{self, AnyTokenizer, Tokenizer};

/// How a transformer directory's text maps to ids.
pub enum Codec {
    /// A `tokenizer.json` that `tokenize::load_json` reads.
    Tokenizer(Box<AnyTokenizer>),
    /// A character-level WordLevel `tokenizer.json` (one piece per character, as
    /// `transformers` writes for char models), which `load_json` does not read.
    Chars(CharVocab),
}

/// One token per character: piece strings by id and the unknown id.
pub struct CharVocab {
    pieces: Vec<String>,
    ids: std::collections::HashMap<char, u32>,
    unk: Option<u32>,
}

impl CharVocab {
    /// Reads a WordLevel `tokenizer.json` whose pieces are all single characters.
    pub fn load(path: &Path) -> Option<CharVocab> {
        let text = std::fs::read_to_string(path).ok()?;
        let value: serde_json::Value = serde_json::from_str(&text).ok()?;
        let model = value.get("model")?;
        if model.get("type")?.as_str()? != "WordLevel" {
            return None;
        }
        let unk_token = model.get("unk_token").and_then(|v| v.as_str());
        let mut entries: Vec<(String, u32)> = Vec::new();
        for (piece, id) in model.get("vocab")?.as_object()? {
            entries.push((piece.clone(), u32::try_from(id.as_u64()?).ok()?));
        }
        let size = entries.iter().map(|(_, id)| *id as usize + 1).max()?;
        let mut pieces = vec![String::new(); size];
        let mut ids = std::collections::HashMap::new();
        let mut unk = None;
        for (piece, id) in entries {
            if Some(piece.as_str()) == unk_token {
                unk = Some(id);
            } else {
                let mut chars = piece.chars();
                let (Some(c), None) = (chars.next(), chars.next()) else {
                    return None;
                };
                ids.insert(c, id);
            }
            pieces[id as usize] = piece;
        }
        Some(CharVocab { pieces, ids, unk })
    }

    /// The same vocabulary as a tokenizer that `tokenize` runs (a BPE model without
    /// merges: every character one symbol, ids unchanged), for counting an n-gram model
    /// over these ids with `nlp ngram train -t`.
    pub fn to_tokenizer(&self) -> Result<AnyTokenizer> {
        let bpe = tokenize::Bpe::new(self.pieces.clone(), Vec::new(), false, self.unk, false, false)?;
        Ok(AnyTokenizer::new(
            tokenize::Model::Bpe(bpe),
            Vec::new(),
            tokenize::PreTokenizer::None,
            tokenize::Decoder::ByteFallback,
            tokenize::ModelKind::Char,
        ))
    }

    pub fn encode(&self, text: &str) -> std::result::Result<Vec<u32>, char> {
        text.chars()
            .map(|c| self.ids.get(&c).copied().or(self.unk).ok_or(c))
            .collect()
    }

    pub fn decode(&self, ids: &[u32]) -> String {
        ids.iter()
            .filter(|&&id| Some(id) != self.unk)
            .filter_map(|&id| self.pieces.get(id as usize))
            .map(String::as_str)
            .collect()
    }
}

impl Codec {
    pub fn load(path: &Path) -> Result<Codec> {
        match tokenize::load_json(path) {
            Ok(tokenizer) => Ok(Codec::Tokenizer(Box::new(tokenizer))),
            Err(error) => match CharVocab::load(path) {
                Some(chars) => Ok(Codec::Chars(chars)),
                None => Err(error.into()),
            },
        }
    }

    /// The tokenizer `tokenize` runs for this file: what `nlp ngram -t` counts with.
    pub fn load_tokenizer(path: &Path) -> Result<AnyTokenizer> {
        match Codec::load(path)? {
            Codec::Tokenizer(tokenizer) => Ok(*tokenizer),
            Codec::Chars(chars) => chars.to_tokenizer(),
        }
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Codec::Tokenizer(tokenizer) => Ok(tokenizer.encode(text)),
            Codec::Chars(chars) => chars.encode(text).map_err(|c| {
                anyhow::anyhow!("the character {c:?} is not in the model's vocabulary")
            }),
        }
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match self {
            Codec::Tokenizer(tokenizer) => Ok(tokenizer.decode(ids)?),
            Codec::Chars(chars) => Ok(chars.decode(ids)),
        }
    }

    pub fn piece(&self, id: u32) -> String {
        match self {
            Codec::Tokenizer(tokenizer) => tokenizer.id_to_piece(id).unwrap_or("").to_string(),
            Codec::Chars(chars) => chars.pieces.get(id as usize).cloned().unwrap_or_default(),
        }
    }
}

/// A loaded model with the way its text maps to ids.
pub enum Loaded {
    Transformer {
        model: Transformer,
        tokenizer: Arc<Codec>,
    },
    Ngram {
        model: NgramModel,
        words: Arc<Vec<String>>,
    },
}

/// The second model of a strategy (contrastive amateur, speculative draft,
/// discriminator), seen in the main model's token ids.
pub enum Companion {
    /// A model whose ids are the main model's as they are.
    Model(Loaded),
    /// An n-gram model counted over the main transformer's token ids (`nlp ngram train
    /// -t DIR/tokenizer.json`), viewed in that tokenizer's id space.
    Subword(SubwordNgram),
}

impl Companion {
    /// Opens the model at `path` (named by `flag`) to stand beside `main`, which was
    /// opened from `main_path`. An n-gram model beside a transformer must have token ids
    /// for words, all inside the transformer's vocabulary; any other pair must share the
    /// vocabulary outright. A mismatch is one error line.
    pub fn open(flag: &str, path: &Path, ctx: &Context, main: &Loaded, main_path: &Path) -> Result<Companion> {
        let second = Loaded::open(path, ctx)?;
        let vocab = main.vocab_size();
        match (main, second) {
            (Loaded::Transformer { .. }, Loaded::Ngram { model, .. }) => {
                // An ARPA file does not name its tokenizer: the ids are the evidence.
                if !SubwordNgram::counts_token_ids(&model) {
                    bail!(
                        "{flag} {}: its words are not token ids, so its vocabulary is not the model's; \
                         count an n-gram model over the model's ids with `nlp ngram train -t {}`",
                        path.display(),
                        main_path.join("tokenizer.json").display()
                    );
                }
                let line_break = match main.encode("\n", "a line break")?.as_slice() {
                    [id] => Some(*id),
                    _ => None,
                };
                let subword = SubwordNgram::new(model, vocab, line_break)
                    .with_context(|| format!("{flag} {} beside the model {}", path.display(), main_path.display()))?;
                Ok(Companion::Subword(subword))
            }
            (Loaded::Ngram { words, .. }, Loaded::Ngram { words: second_words, .. }) if *words != second_words => bail!(
                "{flag} {}: its words and their ids differ from those of the n-gram model {}; \
                 the two must share one vocabulary in one order",
                path.display(),
                main_path.display()
            ),
            (_, second) if second.vocab_size() != vocab => bail!(
                "{flag} {} has a vocabulary of {} tokens but the model {} has {vocab}; \
                 the two must share one tokenizer (the same token ids)",
                path.display(),
                second.vocab_size(),
                main_path.display()
            ),
            (_, second) => Ok(Companion::Model(second)),
        }
    }
}

/// `DIR[:WEIGHT]`: a LoRA adapter directory and the factor on its update (default 1).
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterSpec {
    /// The adapter directory (`adapter_config.json`, `adapter_model.safetensors`).
    pub dir: std::path::PathBuf,
    /// Multiplies the adapter's `alpha / r` scaling.
    pub weight: f64,
}

impl std::str::FromStr for AdapterSpec {
    type Err = String;

    fn from_str(text: &str) -> std::result::Result<Self, String> {
        // A trailing `:number` is the weight; anything else is part of the path.
        if let Some((dir, weight)) = text.rsplit_once(':') {
            if let Ok(weight) = weight.parse::<f64>() {
                if !weight.is_finite() {
                    return Err(format!("the weight in `{text}` must be a finite number"));
                }
                return Ok(AdapterSpec {
                    dir: dir.into(),
                    weight,
                });
            }
        }
        Ok(AdapterSpec {
            dir: text.into(),
            weight: 1.0,
        })
    }
}

impl Loaded {
    pub fn open(path: &Path, ctx: &Context) -> Result<Loaded> {
        Loaded::open_with_adapters(path, ctx, &[])
    }

    /// Opens a model and attaches LoRA `adapters` to it, unmerged; only a transformer
    /// directory takes adapters.
    pub fn open_with_adapters(
        path: &Path,
        ctx: &Context,
        adapters: &[AdapterSpec],
    ) -> Result<Loaded> {
        let mut loaded = Loaded::open_plain(path, ctx)?;
        if adapters.is_empty() {
            return Ok(loaded);
        }
        let Loaded::Transformer { model, .. } = &mut loaded else {
            bail!(
                "{}: --adapter needs a transformer model directory, not an n-gram model",
                path.display()
            );
        };
        for spec in adapters {
            let adapter = crate::lora::Adapter::load(&spec.dir, model.device())
                .with_context(|| format!("loading the adapter in {}", spec.dir.display()))?;
            adapter.attach(model, spec.weight, &spec.dir)?;
        }
        Ok(loaded)
    }

    fn open_plain(path: &Path, ctx: &Context) -> Result<Loaded> {
        let path = &ctx.model_dir(path)?;
        if path.is_dir() {
            let tokenizer_path = path.join("tokenizer.json");
            if !tokenizer_path.is_file() {
                bail!(
                    "{}: no tokenizer.json in this model directory; copy the tokenizer the model was trained with there",
                    path.display()
                );
            }
            let tokenizer = Codec::load(&tokenizer_path)?;
            let device = ctx.config.device()?.resolve()?;
            let model = Transformer::from_pretrained(path, &device, DType::F32)
                .with_context(|| format!("loading the model in {}", path.display()))?;
            return Ok(Loaded::Transformer {
                model,
                tokenizer: Arc::new(tokenizer),
            });
        }
        if !path.is_file() {
            bail!(
                "{}: no such model; pass a model directory (config.json, model.safetensors, tokenizer.json) or an n-gram model (.arpa, .bin)",
                path.display()
            );
        }
        let model = ngram::load(path)
            .with_context(|| format!("loading the n-gram model {}", path.display()))?;
        let words = (0..model.vocab_size() as u32)
            .map(|id| model.word(id).unwrap_or("").to_string())
            .collect();
        Ok(Loaded::Ngram {
            model,
            words: Arc::new(words),
        })
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            Loaded::Transformer { model, .. } => model.vocab_size(),
            Loaded::Ngram { model, .. } => model.vocab_size(),
        }
    }

    /// Positions the model can attend over (a beginning-of-sequence token included);
    /// `None` for an n-gram model, which has no limit.
    pub fn context_len(&self) -> Option<usize> {
        match self {
            Loaded::Transformer { model, .. } => {
                let config = model.config();
                Some(config.max_position_embeddings.saturating_sub(usize::from(config.bos_token_id.is_some())))
            }
            Loaded::Ngram { .. } => None,
        }
    }

    pub fn eos(&self) -> Option<u32> {
        match self {
            Loaded::Transformer { model, .. } => model.config().eos_token_id,
            Loaded::Ngram { model, .. } => model.eos_id(),
        }
    }

    /// Text to ids; every id must be in the model's vocabulary.
    pub fn encode(&self, text: &str, what: &str) -> Result<Vec<u32>> {
        match self {
            Loaded::Transformer { model, tokenizer } => {
                let ids = tokenizer.encode(text).with_context(|| what.to_string())?;
                let vocab = model.vocab_size();
                if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
                    bail!(
                        "{what}: token id {bad} ({:?}) is outside the model's vocabulary of {vocab}; \
                         is the text in the model's alphabet, and does tokenizer.json belong to this model?",
                        tokenizer.piece(bad)
                    );
                }
                Ok(ids)
            }
            Loaded::Ngram { model, .. } => text
                .split_whitespace()
                .map(|word| {
                    model.word_id(word).with_context(|| {
                        format!("{what}: the word `{word}` is not in the n-gram model's vocabulary")
                    })
                })
                .collect(),
        }
    }

    /// Ids to text.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match self {
            Loaded::Transformer { tokenizer, .. } => Ok(tokenizer.decode(ids)?),
            Loaded::Ngram { words, .. } => Ok(join_words(words, ids)),
        }
    }

    /// The piece of each id.
    pub fn pieces(&self, ids: &[u32]) -> Vec<String> {
        ids.iter()
            .map(|&id| match self {
                Loaded::Transformer { tokenizer, .. } => tokenizer.piece(id),
                Loaded::Ngram { words, .. } => {
                    words.get(id as usize).cloned().unwrap_or_default()
                }
            })
            .collect()
    }

    pub fn detokenizer(&self) -> Detokenizer {
        match self {
            Loaded::Transformer { tokenizer, .. } => {
                let tokenizer = Arc::clone(tokenizer);
                Arc::new(move |ids: &[u32]| tokenizer.decode(ids).unwrap_or_default())
            }
            Loaded::Ngram { words, .. } => {
                let words = Arc::clone(words);
                Arc::new(move |ids: &[u32]| join_words(&words, ids))
            }
        }
    }

    /// Token sequences that spell a banned or forced phrase.
    pub fn phrase_ids(&self, phrase: &str, flag: &str) -> Result<Vec<Vec<u32>>> {
        let mut spellings = vec![self.encode(phrase, flag)?];
        if let Loaded::Transformer { .. } = self {
            // Mid-sentence a word usually follows a space, which subword tokenizers fold in.
            if !phrase.starts_with(' ') {
                let spaced = self.encode(&format!(" {phrase}"), flag)?;
                if !spaced.is_empty() && !spellings.contains(&spaced) {
                    spellings.push(spaced);
                }
            }
        }
        spellings.retain(|s| !s.is_empty());
        if spellings.is_empty() {
            bail!("{flag} `{phrase}`: the phrase encodes to no tokens");
        }
        Ok(spellings)
    }
}

/// Whole windows through the transformer, one forward pass per batch of windows.
impl WindowScorer for Transformer {
    fn score_windows(&self, windows: &[(&[u32], usize)]) -> crate::Result<Vec<Vec<Prediction>>> {
        let Some(&(first, from)) = windows.first() else {
            return Ok(Vec::new());
        };
        let (b, t) = (windows.len(), first.len());
        if from == 0 || from >= t || windows.iter().any(|(ids, f)| ids.len() != t || *f != from) {
            return Err(crate::Error::Invalid(
                "a batch of windows must share one length and one first scored position (>= 1)".into(),
            ));
        }
        let vocab = self.config().vocab_size;
        if let Some(&bad) = windows.iter().flat_map(|(ids, _)| *ids).find(|&&id| id as usize >= vocab) {
            return Err(crate::Error::Invalid(format!(
                "token id {bad} is outside the model's vocabulary of {vocab}"
            )));
        }
        let n = t - from;
        // The window's last token is only ever a target: the model reads the others.
        let inputs: Vec<u32> = windows.iter().flat_map(|(ids, _)| ids[..t - 1].iter().copied()).collect();
        let targets: Vec<u32> = windows.iter().flat_map(|(ids, _)| ids[from..].iter().copied()).collect();
        let ids = Tensor::from_vec(inputs, (b, t - 1), self.device())?; // (b, t - 1)
        // Only the rows that predict a scored token: the context part of a window
        // conditions but is not normalised.
        let scores = self.score_tail(&ids, &targets)?;
        Ok(scores
            .chunks(n)
            .zip(targets.chunks(n))
            .map(|(scores, targets)| {
                scores
                    .iter()
                    .zip(targets)
                    .map(|(score, &target)| Prediction {
                        logprob: score.logprob,
                        top_logprob: score.top_logprob,
                        top_id: score.top_id,
                        target,
                    })
                    .collect()
            })
            .collect())
    }
}

impl Loaded {
    /// log p(`continuation` | `prompt`) in nats, each encoded on its own and the ids
    /// concatenated (an n-gram model starts the prompt at `<s>`).
    pub fn continuation_logprob(&self, prompt: &str, continuation: &str) -> Result<f64> {
        let what = "a multiple-choice form";
        match self {
            Loaded::Transformer { model, .. } => {
                let mut ids: Vec<u32> = model.config().bos_token_id.into_iter().collect();
                ids.extend(self.encode(prompt, "a multiple-choice prompt")?);
                let from = ids.len();
                ids.extend(self.encode(continuation, what)?);
                if from == 0 {
                    bail!(
                        "an empty prompt gives a model without a beginning-of-sequence token nothing to condition on; give every item a prompt"
                    );
                }
                if ids.len() == from {
                    bail!("{what} {continuation:?} encodes to no tokens");
                }
                let rows = model.score_windows(&[(&ids, from)])?;
                Ok(rows.iter().flatten().map(|p| f64::from(p.logprob)).sum())
            }
            Loaded::Ngram { model, .. } => {
                let mut state = model.initial_state();
                for word in prompt.split_whitespace() {
                    model.advance(&mut state, model.word_id(word).unwrap_or(model.unk_id()))?;
                }
                let words: Vec<&str> = continuation.split_whitespace().collect();
                if words.is_empty() {
                    bail!("{what} {continuation:?} has no words");
                }
                let mut log10_prob = 0.0f64;
                for word in words {
                    let id = model.word_id(word).unwrap_or(model.unk_id());
                    log10_prob += f64::from(model.log10_prob(&state, id));
                    model.advance(&mut state, id)?;
                }
                Ok(log10_prob * std::f64::consts::LN_10)
            }
        }
    }
}

pub fn join_words(words: &[String], ids: &[u32]) -> String {
    ids.iter()
        .filter_map(|&id| words.get(id as usize))
        .filter(|w| !matches!(w.as_str(), "<s>" | "</s>"))
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(" ")
}

