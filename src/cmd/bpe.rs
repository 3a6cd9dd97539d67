//! `nlp bpe train|encode|decode|stats|export`.

use std::io::{BufRead, Write};
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

/// Lines encoded or decoded per parallel batch: large enough to keep every core
/// busy, small enough to stream a large file in bounded memory.
const LINES_PER_BATCH: usize = 16_384;

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

/// Reads the input (a corpus or stdin) as lines of bytes, in batches, without the
/// line terminators, and hands each batch to `each`.
fn for_each_batch(input: &str, mut each: impl FnMut(&[Vec<u8>]) -> Result<()>) -> Result<()> {
    let mut reader: Box<dyn BufRead> = if input == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        data::resolve(input)?.open()?
    };
    let mut batch: Vec<Vec<u8>> = Vec::with_capacity(LINES_PER_BATCH);
    loop {
        let mut line = Vec::new();
        let read = reader.read_until(b'\n', &mut line).with_context(|| format!("reading {input}"))?;
        if read == 0 {
            break;
        }
        if line.last() == Some(&b'\n') {
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
        }
        batch.push(line);
        if batch.len() == LINES_PER_BATCH {
            each(&batch)?;
            batch.clear();
        }
    }
    if !batch.is_empty() {
        each(&batch)?;
    }
    Ok(())
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
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut line_number = 0u64;
    for_each_batch(&args.input, |lines| {
        let encoded: Vec<Vec<u32>> = if regularize {
            lines
                .iter()
                .enumerate()
                .map(|(i, line)| {
                    // One seed per line, so a line's segmentation does not depend on
                    // how the input was batched.
                    let options = EncodeOptions {
                        dropout: args.dropout,
                        alpha: args.alpha,
                        nbest: args.nbest,
                        seed: ctx.config.run.seed ^ (line_number + i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                    };
                    tokenizer.encode_with(&String::from_utf8_lossy(line), &options)
                })
                .collect()
        } else {
            tokenizer.encode_batch(lines)
        };
        line_number += lines.len() as u64;
        for ids in &encoded {
            write_encoded(&mut out, &tokenizer, ids, args.pieces, ctx.json)?;
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
    for_each_batch(&args.input, |lines| {
        for line in lines {
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
