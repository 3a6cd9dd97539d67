//! Hugging Face `tokenizer.json` reading and writing, and `.tiktoken` rank files.
//!
//! Supported: models `BPE` (vocab object; merges as `"a b"` strings or `["a", "b"]`
//! arrays; `unk_token`, `fuse_unk`, `byte_fallback`) and `Unigram` (`[piece, score]` list,
//! `unk_id`, `byte_fallback`); pre-tokenizers `ByteLevel`, `Metaspace`, `Whitespace`;
//! decoders `ByteLevel`, `Metaspace`, `ByteFallback`; `added_tokens`. Anything else
//! (normalizers, other pre-tokenizers, sequences, subword prefixes...) is refused with an
//! error naming the field, rather than encoding differently from `tokenizers`.
//! The `post_processor` is kept verbatim and written back; encoding does not apply it.

use std::path::Path;

use serde_json::Value;

use super::bpe::Bpe;
use super::pretokenize::{PreTokenizer, PrependScheme};
use super::unigram::Unigram;
use super::{AddedToken, AnyTokenizer, Decoder, Model, ModelKind};
use crate::fsutil::write_atomic;
use crate::{Error, Result};

/// Field access with errors that name the file and the field path.
struct Reader<'a> {
    path: &'a Path,
}

impl Reader<'_> {
    fn err(&self, field: &str, message: impl Into<String>) -> Error {
        Error::Json { path: self.path.to_path_buf(), field: field.to_string(), message: message.into() }
    }

    fn str<'v>(&self, v: &'v Value, field: &str) -> Result<&'v str> {
        v.as_str().ok_or_else(|| self.err(field, format!("expected a string, found {}", kind(v))))
    }

    fn bool_or(&self, obj: &Value, key: &str, field: &str, default: bool) -> Result<bool> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(self.err(&format!("{field}.{key}"), format!("expected true or false, found {}", kind(v)))),
        }
    }

    fn u32(&self, v: &Value, field: &str) -> Result<u32> {
        v.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| self.err(field, format!("expected a token id, found {}", kind(v))))
    }

    fn type_of<'v>(&self, obj: &'v Value, field: &str) -> Result<&'v str> {
        match obj.get("type") {
            Some(t) => self.str(t, &format!("{field}.type")),
            None => Err(self.err(field, "has no `type`")),
        }
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Loads a `tokenizer.json` written by Hugging Face `tokenizers` (or by [`save_json`]).
pub fn load_json(path: &Path) -> Result<AnyTokenizer> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let root: Value = serde_json::from_str(&text).map_err(|e| Error::Json {
        path: path.to_path_buf(),
        field: format!("line {} column {}", e.line(), e.column()),
        message: format!("not valid JSON: {e}"),
    })?;
    from_value(&root, path)
}

/// Builds a tokenizer from a parsed `tokenizer.json`; `path` is only for messages.
pub(crate) fn from_value(root: &Value, path: &Path) -> Result<AnyTokenizer> {
    let r = Reader { path };
    if !root.is_object() {
        return Err(r.err("(root)", format!("expected an object, found {}", kind(root))));
    }
    if let Some(n) = root.get("normalizer").filter(|v| !v.is_null()) {
        let t = r.type_of(n, "normalizer").unwrap_or("?");
        return Err(r.err("normalizer", format!("normalizer `{t}` is not supported (only null)")));
    }
    let added = read_added_tokens(&r, root.get("added_tokens"))?;
    let pre = read_pre_tokenizer(&r, root.get("pre_tokenizer"))?;
    let decoder = read_decoder(&r, root.get("decoder"))?;
    let model_value = root.get("model").ok_or_else(|| r.err("model", "missing"))?;
    let byte_level = matches!(pre, PreTokenizer::ByteLevel { .. });
    let model = read_model(&r, model_value, byte_level)?;
    let kind = match model {
        Model::Bpe(_) => ModelKind::Bpe,
        Model::Unigram(_) => ModelKind::Unigram,
    };
    let mut tok = AnyTokenizer::new(model, added, pre, decoder, kind);
    tok.post_processor = root.get("post_processor").filter(|v| !v.is_null()).cloned();
    Ok(tok)
}

fn read_added_tokens(r: &Reader, v: Option<&Value>) -> Result<Vec<AddedToken>> {
    let Some(v) = v.filter(|v| !v.is_null()) else { return Ok(Vec::new()) };
    let list = v.as_array().ok_or_else(|| r.err("added_tokens", format!("expected an array, found {}", kind(v))))?;
    let mut out = Vec::with_capacity(list.len());
    for (i, t) in list.iter().enumerate() {
        let field = format!("added_tokens[{i}]");
        let id = r.u32(t.get("id").unwrap_or(&Value::Null), &format!("{field}.id"))?;
        let content = r.str(t.get("content").unwrap_or(&Value::Null), &format!("{field}.content"))?;
        if content.is_empty() {
            return Err(r.err(&format!("{field}.content"), "an added token cannot be empty"));
        }
        if r.bool_or(t, "single_word", &field, false)? {
            return Err(r.err(&format!("{field}.single_word"), "single_word tokens are not supported"));
        }
        out.push(AddedToken {
            content: content.to_string(),
            id,
            special: r.bool_or(t, "special", &field, false)?,
            lstrip: r.bool_or(t, "lstrip", &field, false)?,
            rstrip: r.bool_or(t, "rstrip", &field, false)?,
            normalized: r.bool_or(t, "normalized", &field, false)?,
        });
    }
    Ok(out)
}

fn read_prepend_scheme(r: &Reader, obj: &Value, field: &str) -> Result<PrependScheme> {
    match obj.get("prepend_scheme") {
        Some(Value::String(s)) => match s.as_str() {
            "always" => Ok(PrependScheme::Always),
            "first" => Ok(PrependScheme::First),
            "never" => Ok(PrependScheme::Never),
            other => Err(r.err(
                &format!("{field}.prepend_scheme"),
                format!("expected always, first or never, found `{other}`"),
            )),
        },
        // Older files: `add_prefix_space` (default true).
        _ => Ok(if r.bool_or(obj, "add_prefix_space", field, true)? {
            PrependScheme::Always
        } else {
            PrependScheme::Never
        }),
    }
}

fn read_replacement(r: &Reader, obj: &Value, field: &str) -> Result<char> {
    let Some(v) = obj.get("replacement") else { return Ok('▁') };
    let s = r.str(v, &format!("{field}.replacement"))?;
    let mut chars = s.chars();
    match (chars.next(), chars.next()) {
        (Some(c), None) => Ok(c),
        _ => Err(r.err(&format!("{field}.replacement"), format!("expected one character, found `{s}`"))),
    }
}

fn read_pre_tokenizer(r: &Reader, v: Option<&Value>) -> Result<PreTokenizer> {
    let Some(v) = v.filter(|v| !v.is_null()) else { return Ok(PreTokenizer::None) };
    let field = "pre_tokenizer";
    match r.type_of(v, field)? {
        "ByteLevel" => Ok(PreTokenizer::ByteLevel {
            add_prefix_space: r.bool_or(v, "add_prefix_space", field, true)?,
            use_regex: r.bool_or(v, "use_regex", field, true)?,
        }),
        "Metaspace" => Ok(PreTokenizer::Metaspace {
            replacement: read_replacement(r, v, field)?,
            prepend_scheme: read_prepend_scheme(r, v, field)?,
            split: r.bool_or(v, "split", field, true)?,
        }),
        "Whitespace" => Ok(PreTokenizer::Whitespace),
        other => Err(r.err(
            "pre_tokenizer.type",
            format!("pre-tokenizer `{other}` is not supported (ByteLevel, Metaspace, Whitespace or null)"),
        )),
    }
}

fn read_decoder(r: &Reader, v: Option<&Value>) -> Result<Decoder> {
    let Some(v) = v.filter(|v| !v.is_null()) else { return Ok(Decoder::None) };
    let field = "decoder";
    match r.type_of(v, field)? {
        "ByteLevel" => Ok(Decoder::ByteLevel),
        "Metaspace" => Ok(Decoder::Metaspace {
            replacement: read_replacement(r, v, field)?,
            prepend_scheme: read_prepend_scheme(r, v, field)?,
        }),
        "ByteFallback" => Ok(Decoder::ByteFallback),
        other => Err(r.err(
            "decoder.type",
            format!("decoder `{other}` is not supported (ByteLevel, Metaspace, ByteFallback or null)"),
        )),
    }
}

fn read_model(r: &Reader, v: &Value, byte_level: bool) -> Result<Model> {
    let model_type = match v.get("type") {
        Some(t) => r.str(t, "model.type")?,
        // Old files have no type; tell the models apart by their fields.
        None if v.get("merges").is_some() => "BPE",
        None if v.get("vocab").is_some_and(Value::is_array) => "Unigram",
        None => return Err(r.err("model.type", "missing")),
    };
    match model_type {
        "BPE" => read_bpe(r, v, byte_level).map(Model::Bpe),
        "Unigram" => read_unigram(r, v).map(Model::Unigram),
        other => Err(r.err("model.type", format!("model `{other}` is not supported (BPE or Unigram)"))),
    }
}

fn read_bpe(r: &Reader, v: &Value, byte_level: bool) -> Result<Bpe> {
    for key in ["continuing_subword_prefix", "end_of_word_suffix"] {
        if let Some(s) = v.get(key).and_then(Value::as_str).filter(|s| !s.is_empty()) {
            return Err(r.err(&format!("model.{key}"), format!("`{s}` is not supported (only null)")));
        }
    }
    if r.bool_or(v, "ignore_merges", "model", false)? {
        return Err(r.err("model.ignore_merges", "true is not supported"));
    }
    let vocab_v = v.get("vocab").ok_or_else(|| r.err("model.vocab", "missing"))?;
    let vocab_map = vocab_v
        .as_object()
        .ok_or_else(|| r.err("model.vocab", format!("expected an object of piece: id, found {}", kind(vocab_v))))?;
    let mut by_id: Vec<Option<String>> = Vec::new();
    for (piece, id) in vocab_map {
        let id = r.u32(id, &format!("model.vocab[{piece:?}]"))? as usize;
        if id >= by_id.len() {
            by_id.resize(id + 1, None);
        }
        if by_id[id].is_some() {
            return Err(r.err(&format!("model.vocab[{piece:?}]"), format!("id {id} is used twice")));
        }
        by_id[id] = Some(piece.clone());
    }
    if let Some(gap) = by_id.iter().position(Option::is_none) {
        return Err(r.err("model.vocab", format!("no piece has id {gap}; ids must be 0..{}", by_id.len())));
    }
    let vocab: Vec<String> = by_id.into_iter().map(|p| p.expect("gaps were rejected")).collect();
    let ids: std::collections::HashMap<&str, u32> =
        vocab.iter().enumerate().map(|(i, p)| (p.as_str(), i as u32)).collect();
    let merges_v = v.get("merges").ok_or_else(|| r.err("model.merges", "missing"))?;
    let list = merges_v
        .as_array()
        .ok_or_else(|| r.err("model.merges", format!("expected an array, found {}", kind(merges_v))))?;
    let mut merges = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let field = format!("model.merges[{i}]");
        let (a, b) = match m {
            Value::String(s) => {
                let mut parts = s.split(' ');
                match (parts.next(), parts.next(), parts.next()) {
                    (Some(a), Some(b), None) => (a, b),
                    _ => return Err(r.err(&field, "expected two pieces separated by a space")),
                }
            }
            Value::Array(pair) if pair.len() == 2 => {
                (r.str(&pair[0], &format!("{field}[0]"))?, r.str(&pair[1], &format!("{field}[1]"))?)
            }
            _ => return Err(r.err(&field, format!("expected \"a b\" or [\"a\", \"b\"], found {}", kind(m)))),
        };
        let id_of = |p: &str| ids.get(p).copied().ok_or_else(|| r.err(&field, format!("piece `{p}` is not in model.vocab")));
        let (a_id, b_id) = (id_of(a)?, id_of(b)?);
        if !ids.contains_key(format!("{a}{b}").as_str()) {
            return Err(r.err(&field, format!("the merged piece `{a}{b}` is not in model.vocab")));
        }
        merges.push((a_id, b_id));
    }
    let unk = match v.get("unk_token") {
        None | Some(Value::Null) => None,
        Some(t) => {
            let t = r.str(t, "model.unk_token")?;
            Some(*ids.get(t).ok_or_else(|| r.err("model.unk_token", format!("`{t}` is not in model.vocab")))?)
        }
    };
    let fuse_unk = r.bool_or(v, "fuse_unk", "model", false)?;
    let byte_fallback = r.bool_or(v, "byte_fallback", "model", false)?;
    Bpe::new(vocab, merges, byte_level, unk, fuse_unk, byte_fallback).map_err(|e| r.err("model", e.to_string()))
}

fn read_unigram(r: &Reader, v: &Value) -> Result<Unigram> {
    let vocab_v = v.get("vocab").ok_or_else(|| r.err("model.vocab", "missing"))?;
    let list = vocab_v
        .as_array()
        .ok_or_else(|| r.err("model.vocab", format!("expected an array of [piece, score], found {}", kind(vocab_v))))?;
    let mut vocab = Vec::with_capacity(list.len());
    for (i, entry) in list.iter().enumerate() {
        let field = format!("model.vocab[{i}]");
        let pair = entry.as_array().filter(|p| p.len() == 2).ok_or_else(|| r.err(&field, "expected [piece, score]"))?;
        let piece = r.str(&pair[0], &format!("{field}[0]"))?;
        let score = pair[1].as_f64().ok_or_else(|| r.err(&format!("{field}[1]"), "expected a number"))?;
        vocab.push((piece.to_string(), score));
    }
    let unk_id = match v.get("unk_id") {
        None | Some(Value::Null) => None,
        Some(id) => {
            let id = r.u32(id, "model.unk_id")?;
            if id as usize >= vocab.len() {
                return Err(r.err("model.unk_id", format!("{id} is outside the vocabulary ({} pieces)", vocab.len())));
            }
            Some(id)
        }
    };
    if r.bool_or(v, "byte_fallback", "model", false)? {
        return Err(r.err("model.byte_fallback", "byte fallback for Unigram is not supported"));
    }
    Ok(Unigram::new(vocab, unk_id, false))
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).expect("strings always serialize")
}

fn prepend_name(p: PrependScheme) -> &'static str {
    match p {
        PrependScheme::Always => "always",
        PrependScheme::First => "first",
        PrependScheme::Never => "never",
    }
}

/// The `tokenizer.json` text of a tokenizer (vocabulary in id order, merges as arrays).
pub(crate) fn to_json(tok: &AnyTokenizer) -> String {
    let mut out = String::with_capacity(1 << 20);
    out.push_str("{\n  \"version\": \"1.0\",\n  \"truncation\": null,\n  \"padding\": null,\n  \"added_tokens\": [");
    for (i, t) in tok.added.tokens.iter().enumerate() {
        out.push_str(if i == 0 { "\n    " } else { ",\n    " });
        out.push_str(&format!(
            "{{\"id\": {}, \"content\": {}, \"single_word\": false, \"lstrip\": {}, \"rstrip\": {}, \"normalized\": {}, \"special\": {}}}",
            t.id,
            json_str(&t.content),
            t.lstrip,
            t.rstrip,
            t.normalized,
            t.special
        ));
    }
    out.push_str(if tok.added.tokens.is_empty() { "],\n" } else { "\n  ],\n" });
    out.push_str("  \"normalizer\": null,\n");
    let pre = match &tok.pre {
        PreTokenizer::ByteLevel { add_prefix_space, use_regex } => format!(
            "{{\"type\": \"ByteLevel\", \"add_prefix_space\": {add_prefix_space}, \"trim_offsets\": true, \"use_regex\": {use_regex}}}"
        ),
        PreTokenizer::Metaspace { replacement, prepend_scheme, split } => format!(
            "{{\"type\": \"Metaspace\", \"replacement\": {}, \"prepend_scheme\": \"{}\", \"split\": {split}}}",
            json_str(&replacement.to_string()),
            prepend_name(*prepend_scheme)
        ),
        PreTokenizer::Whitespace => "{\"type\": \"Whitespace\"}".to_string(),
        PreTokenizer::None => "null".to_string(),
    };
    out.push_str(&format!("  \"pre_tokenizer\": {pre},\n"));
    let post = match (&tok.post_processor, &tok.pre) {
        (Some(v), _) => v.to_string(),
        (None, PreTokenizer::ByteLevel { .. }) => {
            "{\"type\": \"ByteLevel\", \"add_prefix_space\": true, \"trim_offsets\": false, \"use_regex\": true}".into()
        }
        (None, _) => "null".into(),
    };
    out.push_str(&format!("  \"post_processor\": {post},\n"));
    let decoder = match &tok.decoder {
        Decoder::ByteLevel => {
            "{\"type\": \"ByteLevel\", \"add_prefix_space\": true, \"trim_offsets\": true, \"use_regex\": true}".to_string()
        }
        Decoder::Metaspace { replacement, prepend_scheme } => format!(
            "{{\"type\": \"Metaspace\", \"replacement\": {}, \"prepend_scheme\": \"{}\", \"split\": true}}",
            json_str(&replacement.to_string()),
            prepend_name(*prepend_scheme)
        ),
        Decoder::ByteFallback => "{\"type\": \"ByteFallback\"}".to_string(),
        Decoder::None => "null".to_string(),
    };
    out.push_str(&format!("  \"decoder\": {decoder},\n"));
    match &tok.model {
        Model::Bpe(bpe) => {
            let unk = bpe.unk.map(|id| json_str(&bpe.vocab[id as usize])).unwrap_or_else(|| "null".into());
            out.push_str(&format!(
                "  \"model\": {{\n    \"type\": \"BPE\",\n    \"dropout\": null,\n    \"unk_token\": {unk},\n    \"continuing_subword_prefix\": null,\n    \"end_of_word_suffix\": null,\n    \"fuse_unk\": {},\n    \"byte_fallback\": {},\n    \"ignore_merges\": false,\n    \"vocab\": {{",
                bpe.fuse_unk, bpe.byte_fallback
            ));
            for (id, piece) in bpe.vocab.iter().enumerate() {
                out.push_str(if id == 0 { "\n      " } else { ",\n      " });
                out.push_str(&format!("{}: {id}", json_str(piece)));
            }
            out.push_str("\n    },\n    \"merges\": [");
            for (i, &(a, b)) in bpe.merges.iter().enumerate() {
                out.push_str(if i == 0 { "\n      " } else { ",\n      " });
                out.push_str(&format!("[{}, {}]", json_str(&bpe.vocab[a as usize]), json_str(&bpe.vocab[b as usize])));
            }
            out.push_str("\n    ]\n  }\n}\n");
        }
        Model::Unigram(unigram) => {
            let unk = unigram.unk_id.map(|id| id.to_string()).unwrap_or_else(|| "null".into());
            out.push_str(&format!("  \"model\": {{\n    \"type\": \"Unigram\",\n    \"unk_id\": {unk},\n    \"vocab\": ["));
            for (id, (piece, score)) in unigram.pieces.iter().zip(&unigram.scores).enumerate() {
                out.push_str(if id == 0 { "\n      " } else { ",\n      " });
                // `{:?}` prints the shortest text that reads back as the same f64.
                let score = if score.is_finite() { format!("{score:?}") } else { "-1e300".into() };
                out.push_str(&format!("[{}, {score}]", json_str(piece)));
            }
            out.push_str(&format!("\n    ],\n    \"byte_fallback\": {}\n  }}\n}}\n", unigram.byte_fallback));
        }
    }
    out
}

/// Writes `tok` as a Hugging Face `tokenizer.json`, atomically.
pub fn save_json(tok: &AnyTokenizer, path: &Path) -> Result<()> {
    write_atomic(path, to_json(tok).as_bytes())
}

/// Standard base64 with padding.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = (chunk[0] as u32) << 16
            | (*chunk.get(1).unwrap_or(&0) as u32) << 8
            | *chunk.get(2).unwrap_or(&0) as u32;
        for k in 0..4 {
            if k <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * k) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The `.tiktoken` text: one line per model token, `base64(token bytes) rank`, with the
/// token id as rank; added (special) tokens are left out, as tiktoken passes them apart.
pub(crate) fn to_tiktoken(tok: &AnyTokenizer) -> Result<String> {
    let Model::Bpe(bpe) = &tok.model else {
        return Err(Error::Invalid("a .tiktoken file holds a BPE; this tokenizer is Unigram".into()));
    };
    if !bpe.byte_level {
        return Err(Error::Invalid(
            "a .tiktoken file holds a byte-level BPE; this BPE works on characters".into(),
        ));
    }
    let mut out = String::new();
    for (id, bytes) in bpe.token_bytes.iter().enumerate() {
        if tok.added.by_id(id as u32).is_some() {
            continue;
        }
        out.push_str(&base64(bytes));
        out.push(' ');
        out.push_str(&id.to_string());
        out.push('\n');
    }
    Ok(out)
}

/// Writes a byte-level BPE as a tiktoken rank file, atomically.
pub fn save_tiktoken(tok: &AnyTokenizer, path: &Path) -> Result<()> {
    write_atomic(path, to_tiktoken(tok)?.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_examples() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64(&[0xff, 0xfe]), "//4=");
    }

    #[test]
    fn corrupt_files_name_the_field() {
        let path = Path::new("tok.json");
        let root: Value = serde_json::json!({
            "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": ["a b", "ab"]}
        });
        let err = from_value(&root, path).expect_err("bad merge");
        assert_eq!(err.to_string(), "tok.json: model.merges[1]: expected two pieces separated by a space");
        let root: Value = serde_json::json!({"normalizer": {"type": "NFKC"}, "model": {}});
        let err = from_value(&root, path).expect_err("normalizer");
        assert!(err.to_string().starts_with("tok.json: normalizer: "), "{err}");
        let root: Value = serde_json::json!({"model": {"type": "WordPiece"}});
        let err = from_value(&root, path).expect_err("model");
        assert_eq!(err.to_string(), "tok.json: model.type: model `WordPiece` is not supported (BPE or Unigram)");
    }
}
