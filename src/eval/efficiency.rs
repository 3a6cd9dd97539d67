//! What a model costs to run, as llama-bench reports it: memory (resident after loading,
//! and the peak), time to first token, per-token latency percentiles, and tokens per
//! second for prompt processing and for generation, over repeated runs with mean and
//! standard deviation.
//!
//! A run feeds a prompt in one prefill, picks the most likely next token (the first
//! token's latency is the time to first token), then generates a fixed number of tokens
//! greedily, one step each, whatever they are (no end-of-sequence stop), so that every
//! run does the same work. One untimed warm-up run comes first.

use std::time::Instant;

use crate::lm::LanguageModel;
use crate::{Error, Result};

/// What to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EfficiencySettings {
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// Tokens generated after the first.
    pub gen_tokens: usize,
    /// Timed runs.
    pub repeats: usize,
}

/// Mean, sample standard deviation and range of repeated measurements. The least
/// time is the figure benchmarks usually compare: noise only ever adds to a run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stat {
    /// Arithmetic mean.
    pub mean: f64,
    /// Sample standard deviation (n - 1 in the denominator; 0 for one sample).
    pub std: f64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
}

impl Stat {
    /// Mean, standard deviation and range of `values` (all NaN when there are none).
    pub fn of(values: &[f64]) -> Stat {
        let n = values.len() as f64;
        if values.is_empty() {
            return Stat {
                mean: f64::NAN,
                std: f64::NAN,
                min: f64::NAN,
                max: f64::NAN,
            };
        }
        let mean = values.iter().sum::<f64>() / n;
        let std = match values.len() {
            1 => 0.0,
            _ => (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt(),
        };
        let min = values.iter().copied().fold(f64::INFINITY, f64::min);
        let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        Stat { mean, std, min, max }
    }
}

/// Measured costs of one model.
#[derive(Debug, Clone, PartialEq)]
pub struct Efficiency {
    /// The settings measured.
    pub settings: EfficiencySettings,
    /// Seconds from opening the model to having it ready.
    pub load_seconds: f64,
    /// Resident memory once loaded, bytes (Linux only).
    pub rss_after_load: Option<u64>,
    /// Peak resident memory of the process, bytes (Linux only).
    pub peak_rss: Option<u64>,
    /// Seconds from handing over the prompt to having the first token.
    pub time_to_first_token: Stat,
    /// Seconds from handing over the prompt to having the last token.
    pub time_to_last_token: Stat,
    /// Prompt tokens per second (prefill).
    pub prompt_tokens_per_second: Stat,
    /// Generated tokens per second (one step per token).
    pub gen_tokens_per_second: Stat,
    /// Per-token generation latency in seconds: 50th, 90th and 99th percentiles over
    /// every step of every run.
    pub latency_percentiles: [f64; 3],
}

/// Times `settings.repeats` runs of `model` on `prompt` (which must be
/// `settings.prompt_tokens` long); the load figures come from the caller.
pub fn measure<M: LanguageModel>(
    model: &M,
    prompt: &[u32],
    settings: EfficiencySettings,
    load_seconds: f64,
    rss_after_load: Option<u64>,
) -> Result<Efficiency> {
    if settings.repeats == 0 {
        return Err(Error::Invalid(
            "--repeats 0: measure at least one run".into(),
        ));
    }
    if prompt.is_empty() {
        return Err(Error::Invalid(
            "--prompt-tokens 0: the prompt needs at least one token".into(),
        ));
    }
    run_once(model, prompt, settings.gen_tokens.min(2))?; // warm-up
    let mut first = Vec::new();
    let mut last = Vec::new();
    let mut prompt_rates = Vec::new();
    let mut gen_rates = Vec::new();
    let mut latencies = Vec::new();
    for _ in 0..settings.repeats {
        let run = run_once(model, prompt, settings.gen_tokens)?;
        first.push(run.first_token);
        last.push(run.first_token + run.steps.iter().sum::<f64>());
        prompt_rates.push(prompt.len() as f64 / run.prefill);
        if !run.steps.is_empty() {
            gen_rates.push(run.steps.len() as f64 / run.steps.iter().sum::<f64>());
        }
        latencies.extend(run.steps);
    }
    latencies.sort_by(f64::total_cmp);
    Ok(Efficiency {
        settings,
        load_seconds,
        rss_after_load,
        peak_rss: memory("VmHWM"),
        time_to_first_token: Stat::of(&first),
        time_to_last_token: Stat::of(&last),
        prompt_tokens_per_second: Stat::of(&prompt_rates),
        gen_tokens_per_second: Stat::of(&gen_rates),
        latency_percentiles: [50.0, 90.0, 99.0].map(|p| percentile(&latencies, p)),
    })
}

/// Timings of one run, seconds.
struct Run {
    /// The prompt's forward pass alone.
    prefill: f64,
    /// Prompt in to first token chosen.
    first_token: f64,
    /// Each generation step.
    steps: Vec<f64>,
}

fn run_once<M: LanguageModel>(model: &M, prompt: &[u32], gen_tokens: usize) -> Result<Run> {
    let started = Instant::now();
    let mut state = model.prefill(prompt)?;
    let prefill = started.elapsed().as_secs_f64();
    let mut token = argmax(&model.next_logprobs(std::slice::from_ref(&state))?)?;
    let first_token = started.elapsed().as_secs_f64();
    let mut steps = Vec::with_capacity(gen_tokens);
    for _ in 0..gen_tokens {
        let step = Instant::now();
        model.advance(&mut state, token)?;
        token = argmax(&model.next_logprobs(std::slice::from_ref(&state))?)?;
        steps.push(step.elapsed().as_secs_f64());
    }
    Ok(Run {
        prefill,
        first_token,
        steps,
    })
}

/// The most likely token of the first row.
fn argmax(rows: &[Vec<f32>]) -> Result<u32> {
    let row = rows
        .first()
        .ok_or_else(|| Error::Invalid("the model returned no row".into()))?;
    let best = row
        .iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &lp)| {
            if lp > best.1 {
                (i, lp)
            } else {
                best
            }
        });
    Ok(best.0 as u32)
}

/// The `p`-th percentile of sorted `values` by the nearest-rank method (NaN if empty).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// A memory figure of this process from /proc/self/status (`VmRSS`, `VmHWM`), bytes;
/// `None` where the file does not exist.
pub fn memory(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status
        .lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))?;
    let kib: u64 = line[field.len() + 1..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let values: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(percentile(&values, 50.0), 5.0);
        assert_eq!(percentile(&values, 90.0), 9.0);
        assert_eq!(percentile(&values, 99.0), 10.0);
        assert_eq!(percentile(&[3.0], 50.0), 3.0);
    }

    #[test]
    fn sample_standard_deviation() {
        let stat = Stat::of(&[2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]);
        assert_eq!(stat.mean, 5.0);
        assert!((stat.std - (32.0f64 / 7.0).sqrt()).abs() < 1e-12);
        assert_eq!((stat.min, stat.max), (2.0, 9.0));
        assert_eq!(Stat::of(&[1.5]).std, 0.0);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn peak_memory_is_at_least_resident_memory() {
        let rss = memory("VmRSS").unwrap();
        let peak = memory("VmHWM").unwrap();
        assert!(rss > 0 && peak >= rss);
    }
}
