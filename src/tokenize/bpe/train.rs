//! BPE training (Sennrich et al. 2016): start from characters, repeatedly merge the most
//! frequent adjacent pair, with incremental pair-count updates through a priority queue
//! (stale entries are refreshed lazily when popped; no full recount per merge).
//!
//! `learn_merges` is a pure function of the word counts and reproduces the merges of
//! `tokenizers`' `BpeTrainer` exactly:
//! - ids: special tokens first, then the alphabet (every character of the words plus the
//!   initial alphabet) in code-point order, then merged tokens in creation order;
//! - tie-break: among pairs of equal count the smaller (left id, right id) wins;
//! - each queue entry carries the words it was created for, and a merge rewrites only
//!   those words (new occurrences of a pair get their own entry), as `tokenizers` does;
//! - a merge whose result already exists reuses that id (the merge is still recorded);
//! - `max_token_length`: a new pair is only counted if the merged token would be shorter
//!   than it; `min_frequency`: stop at the first best pair seen fewer times.

use std::collections::BinaryHeap;
use std::collections::HashMap;

use crate::tokenize::bytes::{alphabet, push_mapped};
use crate::tokenize::hash::{pair_key, FastMap};
use crate::tokenize::{
    AddedToken, AnyTokenizer, Bpe, Decoder, Model, ModelKind, PreTokenizer, Progress, TrainOptions,
};
use crate::{Error, Result};

/// What `learn_merges` needs besides the words.
#[derive(Debug, Clone, Default)]
pub(crate) struct BpeConfig {
    pub(crate) vocab_size: usize,
    pub(crate) min_frequency: u64,
    pub(crate) max_token_length: Option<usize>,
    pub(crate) special_tokens: Vec<String>,
}

/// A pair in the merge queue with the words it was counted in.
struct Entry {
    count: u64,
    pair: (u32, u32),
    words: Vec<u32>,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.count == other.count && self.pair == other.pair
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Entry {
    /// Higher count first; among equal counts the smaller pair (max-heap, so reversed).
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.count.cmp(&other.count).then_with(|| other.pair.cmp(&self.pair))
    }
}

/// A vocabulary by id and merges as id pairs.
pub(crate) type VocabAndMerges = (Vec<String>, Vec<(u32, u32)>);

/// Learns merges from word counts (words already in model characters, e.g. GPT-2 mapped).
/// Returns the vocabulary by id and the merges in creation order (a merge that reuses an
/// existing token may appear twice; the model keeps its last rank).
pub(crate) fn learn_merges(
    words: &[(String, u64)],
    initial_alphabet: &[char],
    config: &BpeConfig,
    progress: &dyn Fn(Progress),
) -> Result<VocabAndMerges> {
    let mut vocab: Vec<String> = Vec::with_capacity(config.vocab_size);
    let mut ids: HashMap<String, u32> = HashMap::with_capacity(config.vocab_size);
    for token in &config.special_tokens {
        if !ids.contains_key(token) {
            ids.insert(token.clone(), vocab.len() as u32);
            vocab.push(token.clone());
        }
    }
    let mut chars: Vec<char> = initial_alphabet.to_vec();
    for (word, _) in words {
        chars.extend(word.chars());
    }
    chars.sort_unstable();
    chars.dedup();
    for c in chars {
        let s = c.to_string();
        if !ids.contains_key(&s) {
            ids.insert(s.clone(), vocab.len() as u32);
            vocab.push(s);
        }
    }
    if config.vocab_size < vocab.len() {
        return Err(Error::Invalid(format!(
            "vocab_size {} is smaller than the alphabet plus special tokens ({}); use at least {}",
            config.vocab_size,
            vocab.len(),
            vocab.len()
        )));
    }
    let max_length = config.max_token_length.unwrap_or(usize::MAX);
    // Token lengths in characters, as `tokenizers` tracks symbol lengths.
    let mut token_len: Vec<usize> = vocab.iter().map(|t| t.chars().count()).collect();

    let mut symbols: Vec<Vec<u32>> = Vec::with_capacity(words.len());
    let counts: Vec<u64> = words.iter().map(|(_, c)| *c).collect();
    for (word, _) in words {
        symbols.push(word.chars().map(|c| ids[c.to_string().as_str()]).collect());
    }

    // Initial pair counts, and for each pair the words holding it (ascending, no repeats).
    let mut pair_counts: FastMap<u64, i64> = FastMap::default();
    let mut where_to_update: FastMap<u64, Vec<u32>> = FastMap::default();
    for (w, word) in symbols.iter().enumerate() {
        for pair in word.windows(2) {
            let key = pair_key(pair[0], pair[1]);
            *pair_counts.entry(key).or_insert(0) += counts[w] as i64;
            push_word(where_to_update.entry(key).or_default(), w as u32);
        }
    }
    let mut queue = BinaryHeap::with_capacity(pair_counts.len());
    drain_into_queue(&mut where_to_update, &pair_counts, &mut queue);

    let total = config.vocab_size - vocab.len();
    let mut merges: Vec<(u32, u32)> = Vec::with_capacity(total);
    let mut changes: Vec<((u32, u32), i64, u32)> = Vec::new();
    let mut reported = 0;
    while vocab.len() < config.vocab_size {
        let Some(mut top) = queue.pop() else { break };
        let current = pair_counts.get(&pair_key(top.pair.0, top.pair.1)).copied().unwrap_or(0);
        if top.count != current as u64 {
            top.count = current as u64;
            queue.push(top);
            continue;
        }
        if top.count < 1 || config.min_frequency > top.count {
            break;
        }
        let (a, b) = top.pair;
        let merged = format!("{}{}", vocab[a as usize], vocab[b as usize]);
        let new_id = match ids.get(&merged) {
            Some(&id) => id,
            None => {
                let id = vocab.len() as u32;
                ids.insert(merged.clone(), id);
                token_len.push(token_len[a as usize] + token_len[b as usize]);
                vocab.push(merged);
                id
            }
        };
        merges.push((a, b));

        changes.clear();
        for &w in &top.words {
            merge_word(&mut symbols[w as usize], a, b, new_id, max_length, &token_len, w, &mut changes);
        }
        for &((l, r), change, w) in &changes {
            let key = pair_key(l, r);
            *pair_counts.entry(key).or_insert(0) += change * counts[w as usize] as i64;
            if change > 0 {
                push_word(where_to_update.entry(key).or_default(), w);
            }
        }
        drain_into_queue(&mut where_to_update, &pair_counts, &mut queue);
        if merges.len() >= reported + 100 {
            reported = merges.len();
            progress(Progress::Merging { done: merges.len(), total });
        }
    }
    progress(Progress::Merging { done: merges.len(), total });
    Ok((vocab, merges))
}

/// Appends word `w` unless it is already the last one (words are visited in ascending order).
#[inline]
fn push_word(list: &mut Vec<u32>, w: u32) {
    if list.last() != Some(&w) {
        list.push(w);
    }
}

/// Pushes a queue entry for every pair with new occurrences and a positive count.
fn drain_into_queue(
    where_to_update: &mut FastMap<u64, Vec<u32>>,
    pair_counts: &FastMap<u64, i64>,
    queue: &mut BinaryHeap<Entry>,
) {
    for (key, words) in where_to_update.drain() {
        let count = pair_counts[&key];
        if count > 0 {
            queue.push(Entry {
                count: count as u64,
                pair: ((key >> 32) as u32, key as u32),
                words,
            });
        }
    }
}

/// Merges every non-overlapping (a, b) in `word`, left to right, recording the pair-count
/// changes (pair, ±1, word) exactly as `tokenizers`' `Word::merge` does.
#[allow(clippy::too_many_arguments)]
fn merge_word(
    word: &mut Vec<u32>,
    a: u32,
    b: u32,
    new_id: u32,
    max_length: usize,
    token_len: &[usize],
    w: u32,
    changes: &mut Vec<((u32, u32), i64, u32)>,
) {
    let new_len = token_len[new_id as usize];
    let mut i = 0;
    while i < word.len() {
        if word[i] == a && i + 1 < word.len() && word[i + 1] == b {
            if i > 0 {
                let prev = word[i - 1];
                changes.push(((prev, a), -1, w));
                if token_len[prev as usize].saturating_add(new_len) < max_length {
                    changes.push(((prev, new_id), 1, w));
                }
            }
            word[i] = new_id;
            word.remove(i + 1);
            if i + 1 < word.len() {
                let next = word[i + 1];
                changes.push(((b, next), -1, w));
                if token_len[next as usize].saturating_add(new_len) < max_length {
                    changes.push(((new_id, next), 1, w));
                }
            }
        }
        i += 1;
    }
}

/// Drops repeated merges, keeping each at its last position (the rank `tokenizers` keeps).
pub(crate) fn dedup_merges(merges: Vec<(u32, u32)>) -> Vec<(u32, u32)> {
    let mut last: HashMap<(u32, u32), usize> = HashMap::with_capacity(merges.len());
    for (i, &m) in merges.iter().enumerate() {
        last.insert(m, i);
    }
    merges
        .iter()
        .enumerate()
        .filter(|&(i, m)| last[m] == i)
        .map(|(_, &m)| m)
        .collect()
}

/// Trains a GPT-2 style byte-level BPE from pre-token counts (raw bytes).
pub(crate) fn train_byte_level(
    counts: &FastMap<Box<[u8]>, u64>,
    opts: &TrainOptions,
    progress: &dyn Fn(Progress),
    warnings: &mut Vec<String>,
) -> Result<AnyTokenizer> {
    let mut words: Vec<(String, u64)> = counts
        .iter()
        .map(|(bytes, &count)| {
            let mut s = String::with_capacity(bytes.len() * 2);
            push_mapped(bytes, &mut s);
            (s, count)
        })
        .collect();
    // Word order does not change the result; sorting makes runs reproducible to the byte.
    words.sort_unstable();
    let config = BpeConfig {
        vocab_size: opts.vocab_size,
        min_frequency: opts.min_frequency,
        max_token_length: opts.max_token_length,
        special_tokens: opts.special_tokens.clone(),
    };
    let (vocab, merges) = learn_merges(&words, &alphabet(), &config, progress)?;
    if vocab.len() < opts.vocab_size {
        warnings.push(format!(
            "the vocabulary has {} tokens, fewer than the {} asked: no pair left to merge{}",
            vocab.len(),
            opts.vocab_size,
            if opts.min_frequency > 0 { " at --min-frequency" } else { "" }
        ));
    }
    let merges = dedup_merges(merges);
    let added = specials(&opts.special_tokens);
    let model = Bpe::new(vocab, merges, true, None, false, false)?;
    Ok(AnyTokenizer::new(
        Model::Bpe(model),
        added,
        PreTokenizer::ByteLevel { add_prefix_space: false, use_regex: true },
        Decoder::ByteLevel,
        ModelKind::Bpe,
    ))
}

/// The special tokens as added tokens with ids 0..k (first occurrence wins).
pub(crate) fn specials(tokens: &[String]) -> Vec<AddedToken> {
    let mut out: Vec<AddedToken> = Vec::new();
    for token in tokens {
        if !out.iter().any(|t| &t.content == token) {
            out.push(AddedToken::special(token, out.len() as u32));
        }
    }
    out
}

/// Trains a character tokenizer: special tokens, the 256 byte-fallback tokens `<0xNN>`,
/// then the most frequent characters (ties by code point) up to the vocabulary size.
/// It is a BPE with no merges and no pre-tokenizer, so `tokenizers` loads it as such.
pub(crate) fn train_char(
    counts: &FastMap<Box<[u8]>, u64>,
    opts: &TrainOptions,
    warnings: &mut Vec<String>,
) -> Result<AnyTokenizer> {
    let added = specials(&opts.special_tokens);
    let mut vocab: Vec<String> = added.iter().map(|t| t.content.clone()).collect();
    vocab.extend((0..256).map(|b| format!("<0x{b:02X}>")));
    if opts.vocab_size < vocab.len() {
        return Err(Error::Invalid(format!(
            "vocab_size {} is smaller than the 256 byte tokens plus special tokens; use at least {}",
            opts.vocab_size,
            vocab.len()
        )));
    }
    let mut char_counts: HashMap<char, u64> = HashMap::new();
    for (bytes, &count) in counts {
        for c in String::from_utf8_lossy(bytes).chars() {
            *char_counts.entry(c).or_insert(0) += count;
        }
    }
    let mut chars: Vec<(char, u64)> = char_counts.into_iter().collect();
    // Most frequent first; equal counts by code point, for determinism.
    chars.sort_unstable_by(|x, y| y.1.cmp(&x.1).then(x.0.cmp(&y.0)));
    let room = opts.vocab_size - vocab.len();
    if chars.len() > room {
        warnings.push(format!(
            "{} rare characters did not fit in the vocabulary; they encode as byte tokens",
            chars.len() - room
        ));
    }
    for (c, _) in chars.into_iter().take(room) {
        let s = c.to_string();
        if !vocab.contains(&s) {
            vocab.push(s);
        }
    }
    let model = Bpe::new(vocab, Vec::new(), false, None, false, true)?;
    Ok(AnyTokenizer::new(Model::Bpe(model), added, PreTokenizer::None, Decoder::ByteFallback, ModelKind::Char))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn learn(words: &[(&str, u64)], vocab_size: usize) -> (Vec<String>, Vec<(String, String)>) {
        let words: Vec<(String, u64)> = words.iter().map(|&(w, c)| (w.to_string(), c)).collect();
        let config = BpeConfig { vocab_size, ..Default::default() };
        let (vocab, merges) = learn_merges(&words, &[], &config, &|_| {}).expect("valid input");
        let merges = merges
            .into_iter()
            .map(|(a, b)| (vocab[a as usize].clone(), vocab[b as usize].clone()))
            .collect();
        (vocab, merges)
    }

    #[test]
    fn hand_worked_merges() {
        // Alphabet ids: b=0 g=1 h=2 n=3 p=4 s=5 u=6.
        // Pairs: ug 10+5+5=20... hug 10, pug 5, pun 12, bun 4, hugs 5:
        //   (u,g) = 10+5+5 = 20, (u,n) = 12+4 = 16, (h,u) = 15, (p,u) = 17, (g,s) = 5, (b,u) = 4.
        // 1. ug (20). Then (h,ug) 15, (p,ug) 5, (ug,s) 5; (u,n) 16, (p,u) 12.
        // 2. un (16). Then (p,un) 12, (b,un) 4.
        // 3. hug (15). 4. pun (12). 5. ties at 5: (p,ug) vs (hug,s): ids p=4,ug=7 < hug=9 -> pug.
        let words = [("hug", 10), ("pug", 5), ("pun", 12), ("bun", 4), ("hugs", 5)];
        let (vocab, merges) = learn(&words, 12);
        let pairs: Vec<String> = merges.iter().map(|(a, b)| format!("{a} {b}")).collect();
        assert_eq!(pairs, ["u g", "u n", "h ug", "p un", "p ug"]);
        assert_eq!(vocab[..7], ["b", "g", "h", "n", "p", "s", "u"]);
        assert_eq!(vocab[7..], ["ug", "un", "hug", "pun", "pug"]);
    }

    #[test]
    fn repeated_letters_merge_left_to_right() {
        let (_, merges) = learn(&[("aaaa", 1)], 4);
        // aaaa -> (a,a) x3 -> aa aa -> (aa,aa) -> aaaa
        assert_eq!(merges, [("a".into(), "a".into()), ("aa".into(), "aa".into())]);
    }

    #[test]
    fn min_frequency_and_small_vocab() {
        let words: Vec<(String, u64)> = vec![("ab".into(), 1), ("cd".into(), 3)];
        let config = BpeConfig { vocab_size: 10, min_frequency: 2, ..Default::default() };
        let (_, merges) = learn_merges(&words, &[], &config, &|_| {}).expect("valid");
        assert_eq!(merges.len(), 1);
        let config = BpeConfig { vocab_size: 3, ..Default::default() };
        let err = learn_merges(&words, &[], &config, &|_| {}).expect_err("too small");
        assert!(err.to_string().contains("use at least 4"), "{err}");
    }
}
