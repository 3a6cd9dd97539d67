//! An n-gram model over a tokenizer's ids, seen through the tokenizer's id space.
//!
//! `nlp ngram train -t tokenizer.json` counts token ids written as decimal words
//! ("17", "254"). [`SubwordNgram`] presents such a model to decoding and evaluation
//! with the tokenizer's own ids and vocabulary size, so it can be sampled on its own
//! or stand beside a transformer that shares the tokenizer (as contrastive amateur or
//! speculative draft). Each row is a proper distribution over the tokenizer's ids:
//! ids the model never saw share `<unk>`'s probability equally. Counting split the text
//! into lines, one sentence each, so where the tokenizer has a token for a lone line
//! break that token is the sentence boundary: it takes the end-of-sentence probability,
//! and after it the context starts again at `<s>`. Without one, the end-of-sentence
//! mass is taken out and the rest renormalised, since the token stream then has no
//! sentence end.

use crate::lm::LanguageModel;
use crate::{Error, Result};

use super::NgramModel;

/// An n-gram model whose words are token ids, indexed by those ids.
pub struct SubwordNgram {
    model: NgramModel,
    /// The n-gram word id of each tokenizer id (`<unk>` where the model lacks it).
    word_of_token: Vec<u32>,
    /// The tokenizer id of each n-gram word, where it is one.
    token_of_word: Vec<Option<u32>>,
    /// Tokenizer ids the model never saw; they share `<unk>`'s probability.
    unseen: usize,
    /// The tokenizer's id for a lone line break: the sentence boundary the model counted.
    line_break: Option<u32>,
}

impl SubwordNgram {
    /// Whether every word of `model` besides `<s>`, `</s>` and `<unk>` is a decimal
    /// token id, as `nlp ngram train -t` writes them.
    pub fn counts_token_ids(model: &NgramModel) -> bool {
        (0..model.vocab_len() as u32).all(|id| {
            let word = model.word(id).unwrap_or("");
            matches!(word, "<s>" | "</s>" | "<unk>") || word.parse::<u32>().is_ok()
        })
    }

    /// Views `model` through a tokenizer of `vocab_size` ids whose id for a lone line
    /// break (`"\n"` encoded alone, if that is one token) is `line_break`. Fails when
    /// the model holds a word that is not a token id below `vocab_size`.
    pub fn new(model: NgramModel, vocab_size: usize, line_break: Option<u32>) -> Result<Self> {
        let unk = model.unk_id();
        let mut word_of_token = vec![unk; vocab_size];
        let mut token_of_word = vec![None; model.vocab_len()];
        for word_id in 0..model.vocab_len() as u32 {
            let word = model.word(word_id).unwrap_or("");
            if matches!(word, "<s>" | "</s>" | "<unk>") {
                continue;
            }
            let token = word.parse::<u32>().ok().filter(|&t| (t as usize) < vocab_size);
            let Some(token) = token else {
                return Err(Error::Invalid(format!(
                    "the n-gram model's word `{word}` is not a token id below {vocab_size}; \
                     was it trained with `nlp ngram train -t` and this tokenizer?"
                )));
            };
            word_of_token[token as usize] = word_id;
            token_of_word[word_id as usize] = Some(token);
        }
        // Lines were split at line breaks before counting, so the model never saw the
        // line break's id; it is the end of sentence instead.
        let line_break = line_break.filter(|&id| (id as usize) < vocab_size && word_of_token[id as usize] == unk);
        if let (Some(id), Some(eos)) = (line_break, model.eos_id()) {
            word_of_token[id as usize] = eos;
            token_of_word[eos as usize] = Some(id);
        }
        let line_break = line_break.filter(|_| model.eos_id().is_some());
        let unseen = word_of_token.iter().filter(|&&w| w == unk).count();
        Ok(SubwordNgram {
            model,
            word_of_token,
            token_of_word,
            unseen,
            line_break,
        })
    }

    /// The underlying n-gram model.
    pub fn model(&self) -> &NgramModel {
        &self.model
    }

    /// One next-token distribution in the tokenizer's ids (natural log).
    fn row(&self, context: &[u32]) -> Vec<f32> {
        let words = self.model.log10_distribution(context);
        let mut probs = vec![0.0_f64; self.word_of_token.len()];
        for (word, &log10_prob) in words.iter().enumerate() {
            if let Some(token) = self.token_of_word[word] {
                probs[token as usize] = 10f64.powf(log10_prob as f64);
            }
        }
        if self.unseen > 0 {
            let unk = 10f64.powf(words[self.model.unk_id() as usize] as f64);
            let share = unk / self.unseen as f64;
            let unk_id = self.model.unk_id();
            for (token, &word) in self.word_of_token.iter().enumerate() {
                if word == unk_id {
                    probs[token] = share;
                }
            }
        }
        let total: f64 = probs.iter().sum();
        probs.iter().map(|p| (p / total).ln() as f32).collect()
    }
}

impl LanguageModel for SubwordNgram {
    /// The n-gram context, in the model's word ids.
    type State = Vec<u32>;

    fn vocab_size(&self) -> usize {
        self.word_of_token.len()
    }

    fn initial_state(&self) -> Vec<u32> {
        self.model.initial_state()
    }

    fn advance(&self, state: &mut Vec<u32>, token: u32) -> Result<()> {
        if Some(token) == self.line_break {
            // A new line is a new sentence.
            *state = self.model.initial_state();
            return Ok(());
        }
        let word = *self.word_of_token.get(token as usize).ok_or_else(|| {
            Error::Invalid(format!(
                "token id {token} is outside the tokenizer's vocabulary of {}",
                self.word_of_token.len()
            ))
        })?;
        self.model.advance(state, word)
    }

    fn next_logprobs(&self, states: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        Ok(states.iter().map(|state| self.row(state)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ngram::{read_arpa_from, NgramModel};

    /// A bigram model over the token ids 0, 1 and 3 (2 unseen), written by hand.
    fn model() -> NgramModel {
        let arpa = "\\data\\\nngram 1=6\nngram 2=2\n\n\\1-grams:\n\
                    -1.0\t<unk>\t0\n-99\t<s>\t-0.3\n-0.6\t</s>\t0\n\
                    -0.7\t0\t-0.2\n-0.8\t1\t-0.1\n-0.9\t3\t0\n\n\
                    \\2-grams:\n-0.2\t<s> 0\n-0.3\t0 1\n\n\\end\\\n";
        let arpa = read_arpa_from(arpa.as_bytes(), std::path::Path::new("test.arpa")).unwrap();
        NgramModel::from_arpa(&arpa).unwrap()
    }

    #[test]
    fn rows_are_distributions_over_the_tokenizer_ids() {
        let lm = SubwordNgram::new(model(), 5, None).unwrap();
        assert_eq!(lm.vocab_size(), 5);
        let mut state = lm.initial_state();
        for token in [0, 1, 2, 4, 3] {
            let row = &lm.next_logprobs(std::slice::from_ref(&state)).unwrap()[0];
            let total: f64 = row.iter().map(|&l| (l as f64).exp()).sum();
            assert!((total - 1.0).abs() < 1e-6, "{total}");
            // Unseen ids 2 and 4 share <unk>'s probability equally.
            assert_eq!(row[2], row[4]);
            lm.advance(&mut state, token).unwrap();
        }
    }

    #[test]
    fn seen_ids_keep_the_ratios_of_the_model() {
        let lm = SubwordNgram::new(model(), 5, None).unwrap();
        let state = lm.initial_state();
        let row = &lm.next_logprobs(std::slice::from_ref(&state)).unwrap()[0];
        // After <s>: p(0) = 10^-0.2 from the bigram; p(1) = 10^(-0.3 - 0.8) backed off.
        let expected = (-0.2_f64 - (-0.3 - 0.8)) * std::f64::consts::LN_10;
        assert!(((row[0] - row[1]) as f64 - expected).abs() < 1e-5);
    }

    #[test]
    fn a_line_break_token_is_the_sentence_end() {
        // Id 4 is the line break: it takes </s>'s probability, and after it the model
        // predicts as after <s>; id 2 alone shares <unk>'s.
        let lm = SubwordNgram::new(model(), 5, Some(4)).unwrap();
        let mut state = lm.initial_state();
        let start = lm.next_logprobs(std::slice::from_ref(&state)).unwrap().remove(0);
        // After <s>: p(0) = 10^-0.2 (bigram), p(</s>) = 10^(-0.3 - 0.6) backed off,
        // p(2) = 10^(-0.3 - 1.0) (all of <unk>'s, backed off).
        let ln10 = std::f64::consts::LN_10;
        assert!(((start[0] - start[4]) as f64 - (-0.2 + 0.9) * ln10).abs() < 1e-5);
        assert!(((start[4] - start[2]) as f64 - (-0.9 + 1.3) * ln10).abs() < 1e-5);
        let total: f64 = start.iter().map(|&l| (l as f64).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6, "{total}");
        for token in [1, 3, 4] {
            lm.advance(&mut state, token).unwrap();
        }
        let after_break = lm.next_logprobs(std::slice::from_ref(&state)).unwrap().remove(0);
        assert_eq!(after_break, start);
    }

    #[test]
    fn words_that_are_not_ids_are_refused() {
        assert!(SubwordNgram::new(model(), 3, None).is_err(), "id 3 is not below 3");
        assert!(SubwordNgram::counts_token_ids(&model()));
    }
}
