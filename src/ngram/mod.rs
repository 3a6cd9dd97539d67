//! Count-based n-gram language models: training that reproduces KenLM's `lmplz`
//! (interpolated modified Kneser-Ney) and a few classic alternatives, the ARPA
//! format, a memory-mapped binary format, and scoring.
//!
//! Training is a pipeline of stages, one file each: `count` (padded N-gram
//! counts, spilling sorted runs to disk under a memory budget) -> `adjust`
//! (every order's n-grams with raw and Kneser-Ney adjusted counts, counts of
//! counts) -> `discount` (Chen and Goodman 1998, eq. 26) -> an estimator per
//! method (`kneser_ney`, `witten_bell`, `additive`, `jelinek_mercer`,
//! `maximum_likelihood`) -> `interpolate` (the recursion, backoffs, pruning) ->
//! [`Arpa`]; `arpa` reads and writes the ARPA format, `binary` lays out the
//! binary one, and
//! [`NgramModel`] scores text from an ARPA or binary model and implements
//! [`crate::lm::LanguageModel`].
//!
//! This module does not tokenize beyond splitting lines into words on spaces,
//! tabs, CR and NUL (lmplz's rule); subword tokenizers live elsewhere.

mod additive;
mod adjust;
mod arpa;
mod binary;
mod count;
mod discount;
mod hash;
mod interpolate;
mod jelinek_mercer;
mod kneser_ney;
mod maximum_likelihood;
mod model;
mod subword;
mod vocab;
mod witten_bell;

#[cfg(test)]
mod tests;

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

pub use arpa::{read_arpa, read_arpa_from, write_arpa, write_arpa_to, Arpa, ArpaOrder};
pub use discount::Discount;
pub use model::{load, NgramModel, QueryReport, SentenceScore};
pub use subword::SubwordNgram;

use crate::fsutil::AtomicFile;
use crate::{Error, Result};

/// How probabilities are smoothed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Smoothing {
    /// Interpolated modified Kneser-Ney with three discounts per order (lmplz).
    #[default]
    ModifiedKneserNey,
    /// Interpolated Kneser-Ney with one discount per order.
    KneserNey,
    /// Interpolated Witten-Bell.
    WittenBell,
    /// Additive smoothing with pseudo-count k.
    AddK,
    /// Jelinek-Mercer: per-order linear interpolation tuned on held-out text.
    JelinekMercer,
    /// Maximum likelihood, unsmoothed.
    MaximumLikelihood,
}

impl Smoothing {
    /// Every method with its command-line name.
    pub const ALL: [(&'static str, Smoothing); 6] = [
        ("mkn", Smoothing::ModifiedKneserNey),
        ("kn", Smoothing::KneserNey),
        ("wb", Smoothing::WittenBell),
        ("add-k", Smoothing::AddK),
        ("jm", Smoothing::JelinekMercer),
        ("mle", Smoothing::MaximumLikelihood),
    ];

    /// The command-line name.
    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, s)| *s == self)
            .map(|(name, _)| *name)
            .expect("every method is in ALL")
    }
}

impl std::fmt::Display for Smoothing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Smoothing {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        Self::ALL
            .iter()
            .find(|(name, _)| *name == text)
            .map(|(_, s)| *s)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|(name, _)| *name).collect();
                Error::Invalid(format!(
                    "unknown smoothing method `{text}`; expected one of {}",
                    names.join(", ")
                ))
            })
    }
}

/// What to train.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainOptions {
    /// The highest order N (>= 1).
    pub order: usize,
    /// The smoothing method.
    pub smoothing: Smoothing,
    /// Pruning thresholds per order, as lmplz's `--prune`: an n-gram of order
    /// n >= 2 whose raw count is at most `prune[n-1]` is dropped; the last value
    /// applies to higher orders; must start with 0 and not decrease. Empty: none.
    pub prune: Vec<u64>,
    /// Drop literal `<s>`, `</s>` and `<unk>` from the training text instead of
    /// failing (lmplz's `--skip_symbols`).
    pub skip_symbols: bool,
    /// Interpolate unigrams with the uniform distribution (lmplz's default); when
    /// false `<unk>` gets all the left-over unigram mass, as SRILM.
    pub interpolate_unigrams: bool,
    /// Memory budget for counting; beyond it sorted runs spill to temporary files.
    pub memory_bytes: Option<u64>,
    /// k of add-k smoothing.
    pub add_k: f64,
    /// Held-out text for tuning Jelinek-Mercer weights; by default the last 10%
    /// of the training lines are held out for tuning.
    pub heldout: Option<PathBuf>,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            order: 3,
            smoothing: Smoothing::ModifiedKneserNey,
            prune: Vec::new(),
            skip_symbols: false,
            interpolate_unigrams: true,
            memory_bytes: None,
            add_k: 1.0,
            heldout: None,
        }
    }
}

impl TrainOptions {
    /// Checks the options and returns the pruning threshold of every order.
    fn thresholds(&self) -> Result<Vec<u64>> {
        if self.order < 1 {
            return Err(Error::Invalid(format!(
                "n-gram order must be at least 1, got {}",
                self.order
            )));
        }
        if self.smoothing == Smoothing::AddK && !(self.add_k > 0.0 && self.add_k.is_finite()) {
            return Err(Error::Invalid(format!(
                "add-k needs a positive k, got {}",
                self.add_k
            )));
        }
        if self.prune.is_empty() {
            return Ok(vec![0; self.order]);
        }
        if self.prune[0] != 0 {
            return Err(Error::Invalid(format!(
                "pruning unigrams is not supported (as in lmplz): the first --prune threshold must be 0, got {}",
                self.prune[0]
            )));
        }
        if let Some(pair) = self.prune.windows(2).find(|pair| pair[1] < pair[0]) {
            return Err(Error::Invalid(format!(
                "--prune thresholds must not decrease with the order, got {} after {}",
                pair[1], pair[0]
            )));
        }
        let last = *self.prune.last().expect("not empty");
        Ok((0..self.order)
            .map(|n| self.prune.get(n).copied().unwrap_or(last))
            .collect())
    }
}

/// A trained model with what training has to report.
#[derive(Clone, Debug)]
pub struct Trained {
    /// The estimated model.
    pub model: Arpa,
    /// Non-fatal problems, e.g. orders whose discounts fell back to defaults.
    pub warnings: Vec<String>,
    /// Kneser-Ney discounts per order (empty for other methods).
    pub discounts: Vec<Discount>,
    /// Jelinek-Mercer weights lambda per order (empty for other methods).
    pub lambdas: Vec<f64>,
}

/// Trains a model on the text file `corpus`, one sentence per line.
pub fn train(corpus: &Path, opts: &TrainOptions) -> Result<Trained> {
    let file = File::open(corpus).map_err(|e| Error::io(corpus, e))?;
    train_reader(BufReader::with_capacity(1 << 16, file), corpus, opts)
}

/// Trains a model on text from `reader`; `source` names it in errors.
/// Jelinek-Mercer without a held-out file buffers the text to hold out its end.
pub fn train_reader<R: BufRead>(
    mut reader: R,
    source: &Path,
    opts: &TrainOptions,
) -> Result<Trained> {
    let thresholds = opts.thresholds()?;
    let count_opts = count::CountOptions {
        order: opts.order,
        skip_symbols: opts.skip_symbols,
        memory_bytes: opts.memory_bytes,
    };
    if opts.smoothing != Smoothing::JelinekMercer {
        let mut vocab = vocab::Vocabulary::with_specials();
        let padded = count::count_ngrams(reader, source, &count_opts, &mut vocab)?;
        return estimate(padded, vocab, opts, &thresholds, &[]);
    }

    // Jelinek-Mercer: tune lambdas on held-out text, then estimate from all of
    // the training text.
    let mut text = Vec::new();
    reader
        .read_to_end(&mut text)
        .map_err(|e| Error::io(source, e))?;
    let mut warnings = Vec::new();
    let tuned = match &opts.heldout {
        Some(path) => {
            let mut vocab = vocab::Vocabulary::with_specials();
            let padded = count::count_ngrams(text.as_slice(), source, &count_opts, &mut vocab)?;
            let tables = adjust::adjust_counts(&padded, vocab.len());
            let contexts = adjust::context_rows(&tables.orders);
            let heldout = File::open(path).map_err(|e| Error::io(path, e))?;
            jelinek_mercer::tune(
                &tables.orders,
                &contexts,
                &vocab,
                BufReader::new(heldout),
                path,
            )?
        }
        None => {
            let lines = text.split_inclusive(|&b| b == b'\n').count();
            if lines < 2 {
                return Err(Error::Invalid(format!(
                    "{}: Jelinek-Mercer needs held-out text: give a held-out file or at least two lines to split",
                    source.display()
                )));
            }
            let train_lines = lines - (lines / 10).max(1);
            let cut: usize = text
                .split_inclusive(|&b| b == b'\n')
                .take(train_lines)
                .map(<[u8]>::len)
                .sum();
            let mut vocab = vocab::Vocabulary::with_specials();
            let padded = count::count_ngrams(&text[..cut], source, &count_opts, &mut vocab)?;
            let tables = adjust::adjust_counts(&padded, vocab.len());
            let contexts = adjust::context_rows(&tables.orders);
            let tuned =
                jelinek_mercer::tune(&tables.orders, &contexts, &vocab, &text[cut..], source)?;
            warnings.push(format!(
                "jm: held out the last {} of {lines} lines to tune the weights; the model is then estimated from all lines",
                lines - train_lines
            ));
            tuned
        }
    };
    if tuned.tokens == 0 {
        warnings.push(
            "jm: the held-out text has no in-vocabulary tokens; the weights stay at 0.5"
                .to_string(),
        );
    }
    let mut vocab = vocab::Vocabulary::with_specials();
    let padded = count::count_ngrams(text.as_slice(), source, &count_opts, &mut vocab)?;
    let mut trained = estimate(padded, vocab, opts, &thresholds, &tuned.lambdas)?;
    trained.warnings.splice(0..0, warnings);
    trained.lambdas = tuned.lambdas;
    Ok(trained)
}

/// The stages after counting: adjust, discount or estimate, interpolate.
fn estimate(
    padded: count::PaddedCounts,
    vocab: vocab::Vocabulary,
    opts: &TrainOptions,
    thresholds: &[u64],
    lambdas: &[f64],
) -> Result<Trained> {
    let mut tables = adjust::adjust_counts(&padded, vocab.len());
    // Memory: each stage's input is freed once the next stage has what it needs.
    drop(padded);
    let orders = &tables.orders;
    let contexts = adjust::context_rows(orders);
    let suffixes = adjust::suffix_rows(orders);
    // Pruning is by raw count (lmplz's actual counts) for orders >= 2. With
    // non-decreasing thresholds the survivors are closed under prefixes and
    // suffixes: c(h w) <= c(h) and c(h w) <= c(w').
    let keep: Vec<Vec<bool>> = orders
        .iter()
        .zip(thresholds)
        .map(|(table, &threshold)| {
            if table.order == 1 || threshold == 0 {
                Vec::new()
            } else {
                table.raw.iter().map(|&count| count > threshold).collect()
            }
        })
        .collect();
    // V: every word but <s>.
    let vocab_size = vocab.len() - 1;
    let mut warnings = Vec::new();
    let mut discounts = Vec::new();
    let estimates = match opts.smoothing {
        Smoothing::ModifiedKneserNey | Smoothing::KneserNey => {
            let modified = opts.smoothing == Smoothing::ModifiedKneserNey;
            let (estimated, fallback) =
                discount::estimate_discounts(&tables.counts_of_counts, modified);
            warnings.extend(fallback);
            discounts = estimated;
            kneser_ney::estimate(
                orders,
                &contexts,
                &discounts,
                &keep,
                opts.interpolate_unigrams,
            )
        }
        Smoothing::WittenBell => {
            witten_bell::estimate(orders, &contexts, &keep, opts.interpolate_unigrams)
        }
        Smoothing::AddK => additive::estimate(
            orders,
            &contexts,
            &keep,
            opts.interpolate_unigrams,
            opts.add_k,
            vocab_size,
        ),
        Smoothing::JelinekMercer => {
            jelinek_mercer::estimate(orders, &contexts, &keep, opts.interpolate_unigrams, lambdas)
        }
        Smoothing::MaximumLikelihood => maximum_likelihood::estimate(orders, &contexts, &keep),
    };
    // lmplz: 1.0 / float(V) in double, stored as float.
    let uniform = (1.0 / f64::from(vocab_size as f32)) as f32;
    // Interpolation reads the n-grams, not their counts or contexts.
    drop(contexts);
    tables.orders.iter_mut().for_each(adjust::OrderCounts::drop_counts);
    let model = interpolate::interpolate(
        &tables.orders,
        &suffixes,
        &estimates,
        &keep,
        uniform,
        vocab.into_words(),
    );
    Ok(Trained {
        model,
        warnings,
        discounts,
        lambdas: Vec::new(),
    })
}

/// Writes `model` in the binary format, atomically.
pub fn write_binary(model: &Arpa, path: &Path) -> Result<()> {
    NgramModel::from_arpa(model)?.write_binary(path)
}

/// Writes a file through `write` into a temporary file beside `path`, then
/// renames it over `path` ([`crate::fsutil::AtomicFile`]); on error the
/// temporary file is removed and `path` is left as it was.
pub(crate) fn write_atomically(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<&mut AtomicFile>) -> std::io::Result<()>,
) -> Result<()> {
    let mut file = AtomicFile::create(path)?;
    let written: std::io::Result<()> = (|| {
        let mut out = BufWriter::with_capacity(1 << 20, &mut file);
        write(&mut out)?;
        out.flush()
    })();
    written.map_err(|e| Error::io(path, e))?;
    file.commit()
}
