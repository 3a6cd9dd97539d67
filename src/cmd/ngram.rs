//! `nlp ngram train|query|convert`.

use std::io::{BufRead, Write};
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use serde_json::json;

use super::Context;
use crate::cli::{ModelFormat, NgramCommand, NgramConvertArgs, NgramQueryArgs, NgramTrainArgs};
use crate::config::parse_size;
use crate::data;
use crate::ngram::{self, NgramModel, TrainOptions};
use super::loaded::Codec;
use crate::tokenize::{AnyTokenizer, IdLines};

pub fn run(ctx: &Context, command: NgramCommand) -> Result<()> {
    match command {
        NgramCommand::Train(args) => train(ctx, &args),
        NgramCommand::Query(args) => query(ctx, &args),
        NgramCommand::Convert(args) => convert(ctx, &args),
    }
}

/// The output format: the flag, else the file's extension.
fn output_format(path: &Path, flag: Option<ModelFormat>) -> Result<ModelFormat> {
    if let Some(format) = flag {
        return Ok(format);
    }
    match path.extension().and_then(|e| e.to_str()) {
        Some("arpa") => Ok(ModelFormat::Arpa),
        Some("bin") => Ok(ModelFormat::Binary),
        _ => bail!(
            "{}: cannot tell the model format from the extension; name it .arpa or .bin, or pass --format arpa|binary",
            path.display()
        ),
    }
}

fn train(ctx: &Context, args: &NgramTrainArgs) -> Result<()> {
    let settings = &ctx.config.ngram;
    let format = output_format(&args.output, args.format)?;
    let corpus = data::resolve(&ctx.config.data.corpus)?;
    let tokenizer = args.tokenizer.as_deref().map(load_tokenizer).transpose()?;
    // Held-out text encoded by the tokenizer lives in a temporary file until training ends.
    let mut encoded_heldout = None;
    let heldout = match args.heldout.as_deref().map(data::resolve).transpose()? {
        Some(corpus) => match &tokenizer {
            Some(tokenizer) => {
                let mut file = tempfile::NamedTempFile::new()
                    .context("creating a temporary file for the encoded held-out text")?;
                std::io::copy(&mut IdLines::new(tokenizer, corpus.open()?), &mut file)
                    .with_context(|| format!("encoding the held-out text {corpus}"))?;
                let path = file.path().to_path_buf();
                encoded_heldout = Some(file);
                Some(path)
            }
            None => Some(
                corpus
                    .whole_file()
                    .map(Path::to_path_buf)
                    .context("--heldout takes a whole file; a slice is not supported there")?,
            ),
        },
        None => None,
    };
    let options = TrainOptions {
        order: usize::try_from(settings.order).context("ngram.order is too large")?,
        smoothing: settings.smoothing.parse()?,
        prune: settings.prune.clone(),
        skip_symbols: settings.skip_symbols,
        interpolate_unigrams: settings.interpolate_unigrams,
        memory_bytes: Some(parse_size(&settings.memory).map_err(anyhow::Error::msg)?),
        add_k: settings.add_k,
        heldout,
    };
    tracing::info!(
        "training a {}-gram {} model on {corpus}",
        options.order,
        options.smoothing,
    );
    let started = Instant::now();
    let trained = match &tokenizer {
        Some(tokenizer) => ngram::train_reader(
            std::io::BufReader::new(IdLines::new(tokenizer, corpus.open()?)),
            &corpus.path,
            &options,
        )?,
        None => ngram::train_reader(corpus.open()?, &corpus.path, &options)?,
    };
    drop(encoded_heldout);
    for warning in &trained.warnings {
        tracing::warn!("{warning}");
    }
    match format {
        ModelFormat::Arpa => ngram::write_arpa(&trained.model, &args.output)?,
        ModelFormat::Binary => NgramModel::from_arpa(&trained.model)?.write_binary(&args.output)?,
    }
    let seconds = started.elapsed().as_secs_f64();
    let counts = trained.model.counts();
    if ctx.json {
        let discounts: Vec<_> = trained
            .discounts
            .iter()
            .map(|d| json!([d.d1, d.d2, d.d3_plus]))
            .collect();
        return ctx.print_json(&json!({
            "output": args.output.display().to_string(),
            "corpus": corpus.to_string(),
            "order": options.order,
            "smoothing": options.smoothing.name(),
            "counts": counts,
            "discounts": discounts,
            "lambdas": trained.lambdas,
            "warnings": trained.warnings,
            "seconds": seconds,
        }));
    }
    let mut out = std::io::stdout().lock();
    for (n, count) in counts.iter().enumerate() {
        write!(out, "{}-grams {count}", n + 1)?;
        if let Some(d) = trained.discounts.get(n) {
            write!(out, "\tdiscounts {:.6} {:.6} {:.6}", d.d1, d.d2, d.d3_plus)?;
        }
        if let Some(lambda) = trained.lambdas.get(n) {
            write!(out, "\tlambda {lambda:.6}")?;
        }
        writeln!(out)?;
    }
    writeln!(out, "wrote {} in {seconds:.2} s", args.output.display())?;
    Ok(())
}

/// A tokenizer.json whose ids become the n-gram model's words: any that a model
/// directory may hold, so `-t DIR/tokenizer.json` counts in that model's ids.
pub(super) fn load_tokenizer(path: &Path) -> Result<AnyTokenizer> {
    Codec::load_tokenizer(path).with_context(|| format!("loading the tokenizer {}", path.display()))
}

fn query(ctx: &Context, args: &NgramQueryArgs) -> Result<()> {
    let model = ngram::load(&args.model)?;
    let tokenizer = args.tokenizer.as_deref().map(load_tokenizer).transpose()?;
    let text: Box<dyn BufRead> = if args.text == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(data::resolve(&args.text)?.open()?)
    };
    let report = match &tokenizer {
        Some(tokenizer) => model.query(std::io::BufReader::new(IdLines::new(tokenizer, text)))?,
        None => model.query(text)?,
    };
    if ctx.json {
        let mut value = json!({
            "tokens": report.tokens,
            "oov": report.oov,
            "log10_prob": report.log10_prob,
            "perplexity": report.perplexity,
            "perplexity_excl_oov": report.perplexity_excl_oov,
        });
        if args.per_sentence {
            value["sentences"] = report
                .sentences
                .iter()
                .map(|s| json!({ "log10_prob": s.log10_prob, "oov": s.oov, "tokens": s.tokens }))
                .collect();
        }
        return ctx.print_json(&value);
    }
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    if args.per_sentence {
        writeln!(out, "log10_prob\toov\ttokens")?;
        for sentence in &report.sentences {
            writeln!(out, "{}\t{}\t{}", sentence.log10_prob, sentence.oov, sentence.tokens)?;
        }
    }
    writeln!(out, "Perplexity including OOVs:\t{}", report.perplexity)?;
    writeln!(out, "Perplexity excluding OOVs:\t{}", report.perplexity_excl_oov)?;
    writeln!(out, "OOVs:\t{}", report.oov)?;
    writeln!(out, "Tokens:\t{}", report.tokens)?;
    writeln!(out, "Total log10 probability:\t{}", report.log10_prob)?;
    out.flush()?;
    Ok(())
}

fn convert(ctx: &Context, args: &NgramConvertArgs) -> Result<()> {
    let format = output_format(&args.output, args.format)?;
    let started = Instant::now();
    match format {
        ModelFormat::Arpa => {
            let arpa = ngram::read_arpa(&args.input)?;
            ngram::write_arpa(&arpa, &args.output)?;
        }
        ModelFormat::Binary => ngram::load(&args.input)?.write_binary(&args.output)?,
    }
    let seconds = started.elapsed().as_secs_f64();
    if ctx.json {
        return ctx.print_json(&json!({ "output": args.output.display().to_string(), "seconds": seconds }));
    }
    writeln!(std::io::stdout().lock(), "wrote {} in {seconds:.2} s", args.output.display())?;
    Ok(())
}
