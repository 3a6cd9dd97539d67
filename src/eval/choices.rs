//! Answer-level calibration over multiple-choice items, where an answer may have
//! several accepted surface forms ("CMU" and "Carnegie Mellon University").
//!
//! Input is JSONL, one item per line: `{"prompt": "...", "choices": [["CMU", "Carnegie
//! Mellon University"], ["MIT"]], "answer": 0}`. A choice is a list of forms (a lone
//! string is one form); `answer` is the index of the right choice, or one of its forms.
//! The model's probability of a choice is the sum over its forms of p(form | prompt);
//! those sums are normalised over the choices, the top one is the model's answer and
//! its normalised probability the confidence that [`super::Calibration`] measures.

use std::path::Path;

use serde_json::Value;

use super::Calibration;
use crate::{Error, Result};

/// One multiple-choice question.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    /// Line of the JSONL file it came from (1-based).
    pub line: usize,
    /// The text the choices continue.
    pub prompt: String,
    /// Accepted surface forms of each choice.
    pub choices: Vec<Vec<String>>,
    /// Index of the right choice.
    pub answer: usize,
}

/// How the model answered one item.
#[derive(Debug, Clone, PartialEq)]
pub struct ItemScore {
    /// Normalised probability of each choice.
    pub probabilities: Vec<f64>,
    /// The most probable choice (the lowest index among ties).
    pub predicted: usize,
    /// The right choice.
    pub answer: usize,
}

/// Answer-level results over a set of items.
#[derive(Debug, Clone, PartialEq)]
pub struct AnswerReport {
    /// One score per item, in file order.
    pub items: Vec<ItemScore>,
    /// Calibration of the top choice's probability against being right.
    pub calibration: Calibration,
}

/// Reads the items of a JSONL file; blank lines are skipped.
pub fn read_items(path: &Path) -> Result<Vec<Item>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse_items(&text, path)
}

/// Parses JSONL items; `path` names the source in errors.
pub fn parse_items(text: &str, path: &Path) -> Result<Vec<Item>> {
    let mut items = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let line_number = index + 1;
        let fail = |message: String| Error::Parse {
            path: path.to_path_buf(),
            line: line_number,
            message,
        };
        let value: Value =
            serde_json::from_str(line).map_err(|e| fail(format!("not a JSON object: {e}")))?;
        items.push(parse_item(&value, line_number).map_err(fail)?);
    }
    if items.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: no multiple-choice items",
            path.display()
        )));
    }
    Ok(items)
}

fn parse_item(value: &Value, line: usize) -> std::result::Result<Item, String> {
    let object = value.as_object().ok_or("expected a JSON object")?;
    let prompt = object
        .get("prompt")
        .and_then(Value::as_str)
        .ok_or("`prompt` must be a string")?
        .to_string();
    let choices = object
        .get("choices")
        .and_then(Value::as_array)
        .ok_or("`choices` must be a list")?
        .iter()
        .enumerate()
        .map(|(i, choice)| {
            let forms: Vec<String> = match choice {
                Value::String(form) => vec![form.clone()],
                Value::Array(forms) => forms
                    .iter()
                    .map(|f| f.as_str().map(str::to_string))
                    .collect::<Option<_>>()
                    .ok_or(format!("choice {i}: every form must be a string"))?,
                _ => {
                    return Err(format!(
                        "choice {i}: expected a string or a list of strings"
                    ))
                }
            };
            match forms.is_empty() {
                true => Err(format!("choice {i} has no form")),
                false => Ok(forms),
            }
        })
        .collect::<std::result::Result<Vec<_>, String>>()?;
    if choices.len() < 2 {
        return Err("`choices` needs at least two choices".into());
    }
    let answer = match object.get("answer") {
        Some(Value::Number(n)) => n
            .as_u64()
            .map(|n| n as usize)
            .filter(|&n| n < choices.len())
            .ok_or(format!(
                "`answer` {n} is not a choice index (0..{})",
                choices.len()
            ))?,
        Some(Value::String(form)) => choices
            .iter()
            .position(|forms| forms.contains(form))
            .ok_or(format!("`answer` {form:?} is none of the choices' forms"))?,
        _ => return Err("`answer` must be a choice index or one of the forms".into()),
    };
    Ok(Item {
        line,
        prompt,
        choices,
        answer,
    })
}

/// Scores every item with `logprob(prompt, form)` = log p(form | prompt) in nats and
/// measures the calibration of the answers over `bins` bins.
pub fn score_items(
    items: &[Item],
    bins: usize,
    mut logprob: impl FnMut(&str, &str) -> Result<f64>,
) -> Result<AnswerReport> {
    let mut scores = Vec::with_capacity(items.len());
    for item in items {
        let mut choice_logprobs = Vec::with_capacity(item.choices.len());
        for forms in &item.choices {
            let form_logprobs = forms
                .iter()
                .map(|form| logprob(&item.prompt, form))
                .collect::<Result<Vec<f64>>>()?;
            choice_logprobs.push(log_sum_exp(&form_logprobs));
        }
        let total = log_sum_exp(&choice_logprobs);
        let probabilities: Vec<f64> = choice_logprobs
            .iter()
            .map(|lp| (lp - total).exp())
            .collect();
        let predicted = probabilities.iter().enumerate().fold(0, |best, (i, &p)| {
            if p > probabilities[best] {
                i
            } else {
                best
            }
        });
        scores.push(ItemScore {
            probabilities,
            predicted,
            answer: item.answer,
        });
    }
    let calibration = Calibration::new(
        scores.iter().map(|s| {
            (
                s.probabilities[s.predicted].clamp(0.0, 1.0),
                s.predicted == s.answer,
            )
        }),
        bins,
    )?;
    Ok(AnswerReport {
        items: scores,
        calibration,
    })
}

/// log(sum(exp(x))) without overflow; -inf for an empty or all -inf list.
fn log_sum_exp(values: &[f64]) -> f64 {
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if max == f64::NEG_INFINITY {
        return max;
    }
    max + values.iter().map(|v| (v - max).exp()).sum::<f64>().ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_add_up_and_choices_normalise() {
        let text = r#"{"prompt": "Q", "choices": [["CMU", "Carnegie Mellon University"], "MIT"], "answer": "CMU"}"#;
        let items = parse_items(text, Path::new("items.jsonl")).unwrap();
        assert_eq!(items[0].answer, 0);
        // p(CMU) = 0.1, p(Carnegie Mellon University) = 0.2, p(MIT) = 0.1:
        // choice 0 gets 0.3 / 0.4 = 0.75.
        let report = score_items(&items, 10, |_, form| {
            Ok(match form {
                "CMU" | "MIT" => 0.1f64.ln(),
                _ => 0.2f64.ln(),
            })
        })
        .unwrap();
        let p = &report.items[0].probabilities;
        assert!(
            (p[0] - 0.75).abs() < 1e-12 && (p[1] - 0.25).abs() < 1e-12,
            "{p:?}"
        );
        assert_eq!(report.items[0].predicted, 0);
        // One item at confidence 0.75, right: the gap is 0.25.
        assert!((report.calibration.ece - 0.25).abs() < 1e-12);
    }

    #[test]
    fn a_malformed_line_is_named() {
        let text =
            "{\"prompt\": \"a\", \"choices\": [\"x\", \"y\"], \"answer\": 1}\n\n{\"prompt\": 3}\n";
        let err = parse_items(text, Path::new("items.jsonl"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("items.jsonl:3: "), "{err}");
        let err = parse_items(
            "{\"prompt\": \"a\", \"choices\": [\"x\", \"y\"], \"answer\": 2}",
            Path::new("f"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("f:1:") && err.contains("answer"), "{err}");
        assert!(parse_items("not json", Path::new("f")).is_err());
    }
}
