//! `nlp bpe train|encode|decode|stats|export`.

use std::io::{BufRead, Read, Write};

use rayon::prelude::*;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use serde_json::json;

use super::Context;
use crate::cli::{
    BpeCommand, BpeDecodeArgs, BpeEncodeArgs, BpeExportArgs, BpeStatsArgs, BpeTrainArgs, SubwordModel,
};
use crate::config::parse_size;
use crate::data;
use crate::tokenize::{self, AnyTokenizer, EncodeOptions, ModelKind, Progress, Tokenizer, TrainOptions};

/// Bytes of input read at a time by `encode` and `decode`: large enough to keep every
/// core busy, small enough to stream a large file in bounded memory.
const BLOCK_BYTES: usize = 1 << 22;

pub fn run(ctx: &Context, command: BpeCommand) -> Result<()> {
    match command {
        BpeCommand::Train(args) => train(ctx, &args),
        BpeCommand::Encode(args) => encode(ctx, &args),
        BpeCommand::Decode(args) => decode(ctx, &args),
        BpeCommand::Stats(args) => stats(ctx, &args),
        BpeCommand::Export(args) => export(ctx, &args),
    }
}

fn train(ctx: &Context, args: &BpeTrainArgs) -> Result<()> {
    let names = if args.corpus.is_empty() {
        vec![ctx.config.data.corpus.clone()]
    } else {
        args.corpus.clone()
    };
    let mut files: Vec<PathBuf> = Vec::new();
    for name in &names {
        let corpus = data::resolve(name)?;
        match corpus.whole_file() {
            Some(path) => files.push(path.to_path_buf()),
            None => bail!("{name}: `nlp bpe train` reads whole files; a slice is not supported here"),
        }
    }
    let options = TrainOptions {
        model: match args.model {
            SubwordModel::Bpe => ModelKind::Bpe,
            SubwordModel::Unigram => ModelKind::Unigram,
            SubwordModel::Char => ModelKind::Char,
        },
        vocab_size: args.vocab_size,
        min_frequency: args.min_frequency,
        special_tokens: args.special_tokens.clone(),
        max_token_length: args.max_token_length,
        max_memory: args
            .max_memory
            .as_deref()
            .map(parse_size)
            .transpose()
            .map_err(|e| anyhow::anyhow!("--max-memory {e}"))?,
    };
    let (memory, seconds) = tokenize::estimate(&files, &options)?;
    tracing::info!(
        "estimated {:.0} MB of memory and {seconds:.1} s for {} files",
        memory as f64 / 1e6,
        files.len()
    );

    let counting = crate::progress::bytes_bar(None, "counting", ctx.quiet);
    let merging = crate::progress::count_bar("merging", ctx.quiet);
    let on_progress = |progress: Progress| match progress {
        Progress::Counting { bytes_read, total_bytes } => {
            counting.set_length(total_bytes);
            counting.set_position(bytes_read);
        }
        Progress::Merging { done, total } => {
            counting.finish_and_clear();
            merging.set_length(total as u64);
            merging.set_position(done as u64);
        }
        Progress::Pruning { vocab, target } => {
            counting.finish_and_clear();
            merging.set_message(format!("pruning to {target}"));
            merging.set_position(vocab as u64);
        }
    };
    let started = Instant::now();
    let trained = tokenize::train(&files, &options, &on_progress)?;
    counting.finish_and_clear();
    merging.finish_and_clear();
    for warning in &trained.warnings {
        tracing::warn!("{warning}");
    }
    tokenize::save_json(&trained.tokenizer, &args.output)?;
    let seconds = started.elapsed().as_secs_f64();
    let vocab_size = trained.tokenizer.vocab_size();
    if ctx.json {
        return ctx.print_json(&json!({
            "output": args.output.display().to_string(),
            "vocab_size": vocab_size,
            "seconds": seconds,
            "warnings": trained.warnings,
        }));
    }
    writeln!(
        std::io::stdout().lock(),
        "wrote {} ({vocab_size} tokens) in {seconds:.2} s",
        args.output.display()
    )?;
    Ok(())
}

/// Reads the input (a corpus or stdin) in blocks of whole lines (about `BLOCK_BYTES`
/// each, the last one possibly without its final newline) and hands each to `each`.
fn for_each_block(input: &str, mut each: impl FnMut(&[u8]) -> Result<()>) -> Result<()> {
    let mut reader: Box<dyn BufRead> = if input == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        data::resolve(input)?.open()?
    };
    let mut block: Vec<u8> = Vec::with_capacity(BLOCK_BYTES + (1 << 16));
    loop {
        // Fill to the block size, then finish the line that straddles it.
        let want = BLOCK_BYTES.saturating_sub(block.len()) as u64;
        let read = (&mut reader).take(want).read_to_end(&mut block).with_context(|| format!("reading {input}"))?;
        let more = reader.read_until(b'\n', &mut block).with_context(|| format!("reading {input}"))?;
        if block.is_empty() {
            return Ok(());
        }
        each(&block)?;
        block.clear();
        if read == 0 && more == 0 {
            return Ok(());
        }
    }
}

/// The lines of a block, without their terminators (`\n` or `\r\n`).
fn lines_of(block: &[u8]) -> impl Iterator<Item = &[u8]> {
    let any = !block.is_empty();
    block
        .strip_suffix(b"\n")
        .unwrap_or(block)
        .split(|&b| b == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
        .filter(move |_| any)
}

/// `block` cut at line ends into about `parts` pieces of whole lines.
fn split_lines(block: &[u8], parts: usize) -> Vec<&[u8]> {
    let step = block.len().div_ceil(parts.max(1)).max(1);
    let mut pieces = Vec::with_capacity(parts);
    let mut rest = block;
    while !rest.is_empty() {
        let cut = match rest.get(step..).and_then(|tail| tail.iter().position(|&b| b == b'\n')) {
            Some(at) => step + at + 1,
            None => rest.len(),
        };
        let (piece, tail) = rest.split_at(cut);
        pieces.push(piece);
        rest = tail;
    }
    pieces
}

fn encode(ctx: &Context, args: &BpeEncodeArgs) -> Result<()> {
    let tokenizer = tokenize::load_json(&args.tokenizer)?;
    let regularize = args.dropout.is_some() || args.alpha.is_some();
    if args.nbest.is_some() && args.alpha.is_none() {
        bail!("--nbest samples segmentations: give --alpha too (e.g. --alpha 0.1 --nbest 64)");
    }
    if let Some(p) = args.dropout {
        if !(0.0..=1.0).contains(&p) {
            bail!("--dropout {p}: a probability must lie in [0, 1]");
        }
    }
    // Each worker encodes and formats its own run of lines, so reading and writing
    // are the only serial work.
    let encode_piece = |piece: &[u8], first_line: u64| -> Result<Vec<u8>> {
        let lines = lines_of(piece);
        let encoded: Vec<Vec<u32>> = if regularize {
            lines
                .enumerate()
                .map(|(i, line)| {
                    // One seed per line, so a line's segmentation does not depend on
                    // how the input was split.
                    let options = EncodeOptions {
                        dropout: args.dropout,
                        alpha: args.alpha,
                        nbest: args.nbest,
                        seed: ctx.config.run.seed ^ (first_line + i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                    };
                    tokenizer.encode_with(&String::from_utf8_lossy(line), &options)
                })
                .collect()
        } else {
            tokenizer.encode_each(lines)
        };
        let mut text = Vec::with_capacity(piece.len() * 2);
        for ids in &encoded {
            write_encoded(&mut text, &tokenizer, ids, args.pieces, ctx.json)?;
        }
        Ok(text)
    };
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut line_number = 0u64;
    for_each_block(&args.input, |block| {
        let pieces = split_lines(block, rayon::current_num_threads() * 4);
        let mut firsts = Vec::with_capacity(pieces.len());
        for piece in &pieces {
            firsts.push(line_number);
            line_number += lines_of(piece).count() as u64;
        }
        let texts: Vec<Result<Vec<u8>>> = pieces
            .par_iter()
            .zip(firsts)
            .map(|(piece, first)| encode_piece(piece, first))
            .collect();
        for text in texts {
            out.write_all(&text?)?;
        }
        Ok(())
    })?;
    out.flush()?;
    Ok(())
}

fn write_encoded(out: &mut impl Write, tokenizer: &AnyTokenizer, ids: &[u32], pieces: bool, json: bool) -> Result<()> {
    let piece = |id: &u32| tokenizer.id_to_piece(*id).unwrap_or("").to_string();
    if json {
        let mut value = json!({ "ids": ids });
        if pieces {
            value["pieces"] = ids.iter().map(piece).collect();
        }
        writeln!(out, "{value}")?;
    } else if pieces {
        let pieces: Vec<String> = ids.iter().map(piece).collect();
        writeln!(out, "{}", pieces.join(" "))?;
    } else {
        let mut first = true;
        for id in ids {
            if !first {
                out.write_all(b" ")?;
            }
            first = false;
            write!(out, "{id}")?;
        }
        out.write_all(b"\n")?;
    }
    Ok(())
}

fn decode(_ctx: &Context, args: &BpeDecodeArgs) -> Result<()> {
    let tokenizer = tokenize::load_json(&args.tokenizer)?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut line_number = 0usize;
    for_each_block(&args.input, |block| {
        for line in lines_of(block) {
            line_number += 1;
            let text = std::str::from_utf8(line)
                .with_context(|| format!("{}:{line_number}: not UTF-8", args.input))?;
            let ids = text
                .split_ascii_whitespace()
                .map(|word| {
                    word.parse::<u32>().with_context(|| {
                        format!("{}:{line_number}: `{word}` is not a token id", args.input)
                    })
                })
                .collect::<Result<Vec<u32>>>()?;
            let bytes = tokenizer
                .decode_bytes(&ids)
                .with_context(|| format!("{}:{line_number}", args.input))?;
            out.write_all(&bytes)?;
            out.write_all(b"\n")?;
        }
        Ok(())
    })?;
    out.flush()?;
    Ok(())
}

fn stats(ctx: &Context, args: &BpeStatsArgs) -> Result<()> {
    let tokenizer = tokenize::load_json(&args.tokenizer)?;
    let corpus = data::resolve(&args.text)?;
    let mut bytes = Vec::new();
    corpus.open()?.read_to_end(&mut bytes).with_context(|| corpus.to_string())?;
    let text = String::from_utf8_lossy(&bytes);
    let stats = tokenize::stats(&tokenizer, &text);
    if ctx.json {
        return ctx.print_json(&json!({
            "vocab_size": stats.vocab_size,
            "bytes_per_token": stats.bytes_per_token,
            "tokens_per_word": stats.tokens_per_word,
            "longest_pieces": stats.longest_pieces,
            "unk_or_byte_fallback_share": stats.unk_or_byte_fallback_share,
        }));
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "vocabulary size        {}", stats.vocab_size)?;
    writeln!(out, "bytes per token        {:.3}", stats.bytes_per_token)?;
    writeln!(out, "tokens per word        {:.3}", stats.tokens_per_word)?;
    writeln!(out, "unknown or byte share  {:.4}", stats.unk_or_byte_fallback_share)?;
    writeln!(out, "longest pieces         {}", stats.longest_pieces.join("  "))?;
    Ok(())
}

fn export(ctx: &Context, args: &BpeExportArgs) -> Result<()> {
    let tokenizer = tokenize::load_json(&args.tokenizer)?;
    tokenize::save_tiktoken(&tokenizer, &args.output)?;
    if ctx.json {
        return ctx.print_json(&json!({ "output": args.output.display().to_string() }));
    }
    writeln!(std::io::stdout().lock(), "wrote {}", args.output.display())?;
    Ok(())
}
