//! The tokenizer a training run uses: a character vocabulary built from the corpus, the
//! 256 bytes, or a `tokenizer.json` (e.g. from `nlp bpe train`).
//!
//! The character vocabulary is nanoGPT's (`shakespeare_char/prepare.py`): the sorted set
//! of the corpus's characters, id = rank, so Tiny Shakespeare gets the 65 ids of
//! `shared/fixtures/hf_tiny_llama/vocab.json`. It is saved as a BPE model without
//! merges and without a pre-tokenizer (every character is one symbol and nothing merges)
//! with a `ByteFallback` decoder, which both our `tokenize` module and Hugging Face
//! `tokenizers` load and encode identically. (The fixture's `WordLevel` form is not
//! written because `tokenize` cannot read it back.) The byte tokenizer is the same with
//! the 256 `<0xNN>` byte tokens and byte fallback: id = byte value.

use std::path::Path;

use crate::tokenize::{AnyTokenizer, Bpe, Decoder, Model, ModelKind, PreTokenizer};
use crate::{Error, Result};

/// The sorted set of characters of `text`, as a tokenizer with id = rank.
pub fn char_tokenizer(text: &str) -> Result<AnyTokenizer> {
    let mut chars: Vec<char> = text.chars().collect();
    chars.sort_unstable();
    chars.dedup();
    if chars.is_empty() {
        return Err(Error::Invalid(
            "the corpus is empty: no characters to build a vocabulary from".into(),
        ));
    }
    let vocab = chars.iter().map(char::to_string).collect();
    let bpe = Bpe::new(vocab, Vec::new(), false, None, false, false)?;
    Ok(AnyTokenizer::new(
        Model::Bpe(bpe),
        Vec::new(),
        PreTokenizer::None,
        Decoder::ByteFallback,
        ModelKind::Char,
    ))
}

/// 256 byte tokens `<0x00>`..`<0xFF>` with id = byte value.
pub fn byte_tokenizer() -> Result<AnyTokenizer> {
    let vocab = (0..256).map(|b| format!("<0x{b:02X}>")).collect();
    let bpe = Bpe::new(vocab, Vec::new(), false, None, false, true)?;
    Ok(AnyTokenizer::new(
        Model::Bpe(bpe),
        Vec::new(),
        PreTokenizer::None,
        Decoder::ByteFallback,
        ModelKind::Char,
    ))
}

/// The tokenizer `train.tokenizer` names: "char" (built from `text`), "byte", or a path.
pub fn resolve_tokenizer(spec: &str, text: &str) -> Result<AnyTokenizer> {
    match spec {
        "char" => char_tokenizer(text),
        "byte" => byte_tokenizer(),
        path => {
            let path = Path::new(path);
            if !path.exists() {
                return Err(Error::Config {
                    path: path.to_path_buf(),
                    key: "train.tokenizer".into(),
                    message: "no such file; give \"char\", \"byte\" or a tokenizer.json \
                              (make one with `nlp bpe train`)"
                        .into(),
                });
            }
            crate::tokenize::load_json(path)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenize::Tokenizer;

    #[test]
    fn char_vocabulary_is_the_sorted_character_set() {
        let tok = char_tokenizer("hello world\n").unwrap();
        assert_eq!(tok.vocab_size(), 9);
        assert_eq!(tok.id_to_piece(0), Some("\n"));
        assert_eq!(tok.id_to_piece(1), Some(" "));
        let ids = tok.encode("hello world");
        assert_eq!(ids, vec![4, 3, 5, 5, 6, 1, 8, 6, 7, 5, 2]);
        assert_eq!(tok.decode(&ids).unwrap(), "hello world");
    }

    #[test]
    fn saved_char_and_byte_tokenizers_load_in_hf_tokenizers() {
        let dir = tempfile::tempdir().unwrap();
        let text = "First Citizen:\nBefore we proceed, hear me speak. \u{e9}t\u{e9}";
        for (name, tok) in [
            ("char", char_tokenizer(text).unwrap()),
            ("byte", byte_tokenizer().unwrap()),
        ] {
            let path = dir.path().join(format!("{name}.json"));
            crate::tokenize::save_json(&tok, &path).unwrap();
            let ours = crate::tokenize::load_json(&path).unwrap();
            let hf = tokenizers::Tokenizer::from_file(&path).unwrap();
            let sample = "Before we speak, \u{e9}t\u{e9}.\n";
            let hf_ids = hf.encode(sample, false).unwrap().get_ids().to_vec();
            assert_eq!(ours.encode(sample), hf_ids, "{name}");
            assert_eq!(tok.encode(sample), hf_ids, "{name}");
            assert_eq!(hf.decode(&hf_ids, false).unwrap(), sample, "{name}");
            assert_eq!(ours.decode(&hf_ids).unwrap(), sample, "{name}");
        }
        assert_eq!(
            byte_tokenizer().unwrap().encode("A\u{e9}"),
            vec![0x41, 0xC3, 0xA9]
        );
    }
}
