//! Tests against the `tokenizers` crate (the oracle, a dev-dependency) on the shared
//! corpora and fixtures: same pre-token splits, same ids for every line, same merges.

use std::path::{Path, PathBuf};

use tokenizers::pre_tokenizers::byte_level::ByteLevel as HfByteLevel;
use tokenizers::pre_tokenizers::whitespace::Whitespace as HfWhitespace;
use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString};

use super::bytes::push_mapped;
use super::pretokenize::{split_gpt2, split_whitespace};
use super::*;

const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data");
const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/fixtures/tokenizers");
const CORPORA: [&str; 3] = ["tinyshakespeare.txt", "ptb.valid.txt", "wikitext2.valid.txt"];

fn corpus(name: &str) -> String {
    std::fs::read_to_string(Path::new(DATA).join(name)).expect("shared corpus is readable")
}

/// Every line of the three corpora, each with its newline (as training reads them).
fn all_lines() -> Vec<String> {
    CORPORA
        .iter()
        .flat_map(|name| corpus(name).split_inclusive('\n').map(str::to_string).collect::<Vec<_>>())
        .collect()
}

fn hf_splits(pre: &dyn tokenizers::PreTokenizer, text: &str) -> Vec<String> {
    let mut pts = PreTokenizedString::from(text);
    pre.pre_tokenize(&mut pts).expect("oracle pre-tokenizes");
    pts.get_splits(OffsetReferential::Original, OffsetType::Byte)
        .into_iter()
        .map(|(s, _, _)| s.to_string())
        .collect()
}

#[test]
fn gpt2_scanner_splits_every_line_like_the_regex() {
    let hf = HfByteLevel::new(false, true, true);
    let lines = all_lines();
    let mut texts: Vec<String> = lines.clone();
    // Whole files too, so runs of blank lines and spaces across lines are covered.
    texts.extend(CORPORA.iter().map(|name| corpus(name)));
    texts.push("Ⅻ ǅx ٣٤ a\u{0301}b \u{a0}\u{a0}x  \t\n y ''s 'S".to_string());
    for text in &texts {
        let mut ours = Vec::new();
        split_gpt2(text.as_bytes(), &mut |p| {
            let mut s = String::new();
            push_mapped(p, &mut s);
            ours.push(s)
        });
        assert_eq!(ours, hf_splits(&hf, text), "line {text:?}");
    }
}

#[test]
fn whitespace_splitter_matches_the_oracle() {
    let hf = HfWhitespace {};
    for line in all_lines().iter().chain(std::iter::once(&"a_b ٣x é\u{0301}! ǅ".to_string())) {
        let mut ours = Vec::new();
        split_whitespace(line, |p| ours.push(p.to_string()));
        assert_eq!(ours, hf_splits(&hf, line), "line {line:?}");
    }
}

/// Encodes every corpus line with ours and with the oracle loaded from `path`.
fn assert_same_ids(ours: &AnyTokenizer, path: &Path) {
    let oracle = tokenizers::Tokenizer::from_file(path).expect("oracle loads the file");
    let lines = all_lines();
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    let expected = oracle.encode_batch(refs.clone(), false).expect("oracle encodes");
    let got = ours.encode_batch(&refs);
    let mut mismatches = 0;
    for ((line, want), have) in lines.iter().zip(&expected).zip(&got) {
        if want.get_ids() != have.as_slice() {
            if mismatches < 5 {
                eprintln!("{}: {line:?}\n  oracle {:?}\n  ours   {:?}", path.display(), want.get_ids(), have);
            }
            mismatches += 1;
        }
    }
    assert_eq!(mismatches, 0, "{} of {} lines differ for {}", mismatches, lines.len(), path.display());
    // Longer texts with special tokens inside.
    for text in ["<|endoftext|>Hello<|endoftext|> world<unk>", "[UNK]x  y\n\n z<|endoftext|>"] {
        let want = oracle.encode(text, false).expect("oracle encodes");
        assert_eq!(ours.encode(text), want.get_ids(), "{text:?} with {}", path.display());
    }
}

#[test]
fn fixtures_encode_like_the_oracle() {
    for name in [
        "bytelevel_bpe_300_tinyshakespeare.json",
        "bytelevel_bpe_8000_shakespeare.json",
        "whitespace_bpe_8000_shakespeare.json",
        "unigram_8000_shakespeare.json",
    ] {
        let path = Path::new(FIXTURES).join(name);
        let ours = load_json(&path).expect("we load the fixture");
        assert_same_ids(&ours, &path);
    }
}

#[test]
fn byte_level_round_trips_any_bytes() {
    let tok = load_json(&Path::new(FIXTURES).join("bytelevel_bpe_8000_shakespeare.json")).expect("fixture");
    let text = corpus("wikitext2.valid.txt");
    assert_eq!(tok.decode(&tok.encode(&text)).expect("ids are in range"), text);
    let raw: Vec<u8> = (0..=255u8).chain(b"caf\xc3\xa9 \xe2\x82".iter().copied()).collect();
    assert_eq!(tok.decode_bytes(&tok.encode_bytes(&raw)).expect("in range"), raw);
    assert!(tok.decode(&[1_000_000]).is_err());
}

fn train_on(files: &[&str], opts: &TrainOptions) -> Trained {
    let files: Vec<PathBuf> = files.iter().map(|f| Path::new(DATA).join(f)).collect();
    train(&files, opts, &|_| {}).expect("training succeeds")
}

#[test]
fn bpe_300_merges_equal_the_fixture() {
    let opts = TrainOptions {
        vocab_size: 300,
        special_tokens: vec!["<|endoftext|>".into()],
        ..TrainOptions::default()
    };
    let trained = train_on(&["tinyshakespeare.txt"], &opts);
    let Model::Bpe(ours) = &trained.tokenizer.model else { panic!("trained a BPE") };
    let fixture = load_json(&Path::new(FIXTURES).join("bytelevel_bpe_300_tinyshakespeare.json")).expect("fixture");
    let Model::Bpe(theirs) = &fixture.model else { panic!("fixture is BPE") };
    let named = |b: &Bpe| -> Vec<String> {
        b.merges.iter().map(|&(x, y)| format!("{} {}", b.vocab[x as usize], b.vocab[y as usize])).collect()
    };
    assert_eq!(named(ours), named(theirs));
    assert_eq!(ours.vocab, theirs.vocab);
}

#[test]
fn trained_bpe_saved_encodes_like_the_oracle() {
    let opts = TrainOptions {
        vocab_size: 2000,
        special_tokens: vec!["<|endoftext|>".into(), "<pad>".into()],
        ..TrainOptions::default()
    };
    let trained = train_on(&["tinyshakespeare.txt", "ptb.valid.txt"], &opts);
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("tokenizer.json");
    save_json(&trained.tokenizer, &path).expect("saved");
    let reloaded = load_json(&path).expect("we reload our own file");
    assert_same_ids(&reloaded, &path);
    assert_same_ids(&trained.tokenizer, &path);
    save_tiktoken(&trained.tokenizer, &dir.path().join("t.tiktoken")).expect("tiktoken written");
}

#[test]
fn char_tokenizer_saved_encodes_like_the_oracle() {
    let opts = TrainOptions { model: ModelKind::Char, vocab_size: 300, ..TrainOptions::default() };
    let trained = train_on(&["ptb.valid.txt"], &opts);
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("tokenizer.json");
    save_json(&trained.tokenizer, &path).expect("saved");
    assert_same_ids(&trained.tokenizer, &path);
    let text = "naïve café — ok";
    assert_eq!(trained.tokenizer.decode(&trained.tokenizer.encode(text)).expect("in range"), text);
}

fn write_temp(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("temp file written");
    path
}

#[test]
fn trained_unigram_saved_encodes_like_the_oracle_and_compresses_like_the_fixture() {
    let text = corpus("tinyshakespeare.txt");
    let cut = text[..text.len() * 9 / 10].rfind('\n').expect("has lines") + 1;
    let (train_text, held_out) = text.split_at(cut);
    let dir = tempfile::tempdir().expect("temp dir");
    let train_file = write_temp(dir.path(), "train.txt", train_text);
    let opts = TrainOptions { model: ModelKind::Unigram, vocab_size: 8000, ..TrainOptions::default() };
    let start = std::time::Instant::now();
    let trained = train(&[train_file], &opts, &|_| {}).expect("trains");
    eprintln!("unigram 8000 on {:.1} MB: {:.1} s", train_text.len() as f64 / 1e6, start.elapsed().as_secs_f64());
    let tok = &trained.tokenizer;
    assert_eq!(tok.vocab_size(), 8000, "{:?}", trained.warnings);
    let path = dir.path().join("tokenizer.json");
    save_json(tok, &path).expect("saved");
    assert_same_ids(tok, &path);
    assert_same_ids(&load_json(&path).expect("reloads"), &path);
    let fixture = load_json(&Path::new(FIXTURES).join("unigram_8000_shakespeare.json")).expect("fixture");
    let ours = stats(tok, held_out);
    let theirs = stats(&fixture, held_out);
    eprintln!("held-out bytes/token: ours {:.3}, fixture {:.3}", ours.bytes_per_token, theirs.bytes_per_token);
    // The fixture saw these lines (it was trained on all of Shakespeare); allow 8%.
    assert!(ours.bytes_per_token > theirs.bytes_per_token * 0.92, "{ours:?} vs {theirs:?}");
    let sample = "To be, or not to be: that is the question.";
    assert_eq!(tok.decode(&tok.encode(sample)).expect("in range"), sample);
}

#[test]
fn subword_regularization_laws() {
    let bpe = load_json(&Path::new(FIXTURES).join("bytelevel_bpe_8000_shakespeare.json")).expect("fixture");
    let uni = load_json(&Path::new(FIXTURES).join("unigram_8000_shakespeare.json")).expect("fixture");
    let text: String = corpus("tinyshakespeare.txt").lines().take(200).collect::<Vec<_>>().join("\n");
    let plain = bpe.encode(&text);
    let p0 = EncodeOptions { dropout: Some(0.0), seed: 3, ..EncodeOptions::default() };
    assert_eq!(bpe.encode_with(&text, &p0), plain, "p = 0 is plain encoding");
    let p1 = EncodeOptions { dropout: Some(1.0), seed: 3, ..EncodeOptions::default() };
    let Model::Bpe(model) = &bpe.model else { panic!("BPE fixture") };
    let bytes_only = bpe.encode_with(&text, &p1);
    assert_eq!(bytes_only.len(), text.len(), "p = 1 gives one token per byte");
    assert!(bytes_only.iter().all(|&id| model.is_byte_token(id)));
    let half = EncodeOptions { dropout: Some(0.3), seed: 9, ..EncodeOptions::default() };
    let sampled = bpe.encode_with(&text, &half);
    assert_ne!(sampled, plain);
    assert!(sampled.len() > plain.len());
    assert_eq!(sampled, bpe.encode_with(&text, &half), "same seed, same output");
    assert_eq!(bpe.decode(&sampled).expect("in range"), text);
    let a = EncodeOptions { alpha: Some(0.2), seed: 5, ..EncodeOptions::default() };
    let sampled = uni.encode_with(&text, &a);
    assert_ne!(sampled, uni.encode(&text));
    assert_eq!(sampled, uni.encode_with(&text, &a), "same seed, same output");
    assert_ne!(sampled, uni.encode_with(&text, &EncodeOptions { seed: 6, ..a.clone() }));
    let plain_decoded = uni.decode(&uni.encode(&text)).expect("in range");
    assert_eq!(uni.decode(&sampled).expect("in range"), plain_decoded);
    assert_eq!(plain_decoded, text);
}

#[test]
fn stats_and_training_errors() {
    let bpe = load_json(&Path::new(FIXTURES).join("bytelevel_bpe_8000_shakespeare.json")).expect("fixture");
    let s = stats(&bpe, "To be, or not to be: that is the question. Ωμέγα");
    assert_eq!(s.vocab_size, 8000);
    assert!(s.bytes_per_token > 2.0 && s.tokens_per_word > 1.0, "{s:?}");
    assert_eq!(s.longest_pieces.len(), 10);
    assert!(s.unk_or_byte_fallback_share > 0.0);
    let dir = tempfile::tempdir().expect("temp dir");
    let empty = write_temp(dir.path(), "empty.txt", "");
    let err = train(&[empty], &TrainOptions::default(), &|_| {}).expect_err("empty corpus");
    assert!(err.to_string().contains("empty"), "{err}");
    let small = write_temp(dir.path(), "small.txt", "hello world\n");
    let opts = TrainOptions { vocab_size: 100, special_tokens: vec!["<s>".into()], ..TrainOptions::default() };
    let err = train(std::slice::from_ref(&small), &opts, &|_| {}).expect_err("vocab too small");
    assert!(err.to_string().contains("use at least 257"), "{err}");
    let opts = TrainOptions { max_memory: Some(2000), vocab_size: 300, ..TrainOptions::default() };
    let trained = train(&[Path::new(DATA).join("ptb.valid.txt")], &opts, &|_| {}).expect("trains");
    assert!(trained.warnings.iter().any(|w| w.contains("dropped")), "{:?}", trained.warnings);
}

