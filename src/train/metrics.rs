//! Training metrics: `metrics.jsonl` (one JSON object per logged step: `step`, `lr`,
//! `train_loss`, `tokens_per_s`, `grad_norm`, and `val_loss` at evaluation steps) and
//! the loss curve drawn from it as a hand-written SVG.
//!
//! On resume the log is cut back to the checkpoint's step, so the lines of steps that
//! were trained again are not doubled.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::fsutil::write_atomic;
use crate::{Error, Result};

/// File name of the metrics log inside the output folder.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// File name of the loss curve inside the output folder.
pub const PLOT_FILE: &str = "loss.svg";

/// An append-only `metrics.jsonl`.
#[derive(Debug)]
pub struct MetricsLog {
    path: PathBuf,
    out: BufWriter<File>,
}

impl MetricsLog {
    /// Starts a new log at `path`, or (resuming) keeps the lines up to `keep_through` step.
    pub fn open(path: &Path, keep_through: Option<u64>) -> Result<Self> {
        match keep_through {
            None => write_atomic(path, b"")?,
            Some(step) => {
                let text = match std::fs::read_to_string(path) {
                    Ok(text) => text,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
                    Err(e) => return Err(Error::io(path, e)),
                };
                let kept: String = text
                    .lines()
                    .filter(|line| {
                        serde_json::from_str::<Value>(line)
                            .ok()
                            .and_then(|v| v.get("step").and_then(Value::as_u64))
                            .is_some_and(|s| s <= step)
                    })
                    .map(|line| format!("{line}\n"))
                    .collect();
                write_atomic(path, kept.as_bytes())?;
            }
        }
        let file = OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        Ok(MetricsLog {
            path: path.to_path_buf(),
            out: BufWriter::new(file),
        })
    }

    /// Appends one record and flushes it, so `tail -f metrics.jsonl` follows the run.
    pub fn write(&mut self, record: &Value) -> Result<()> {
        writeln!(self.out, "{record}").map_err(|e| Error::io(&self.path, e))?;
        self.flush()
    }

    /// Pushes buffered lines to the file.
    pub fn flush(&mut self) -> Result<()> {
        self.out.flush().map_err(|e| Error::io(&self.path, e))
    }
}

/// One logged step of a training loop, as a `metrics.jsonl` line holds it.
#[derive(Debug, Clone, Copy)]
pub struct StepRecord {
    /// Optimiser steps done.
    pub step: u64,
    /// Learning rate of this step.
    pub lr: f64,
    /// Mean training loss of this step (nats per token).
    pub train_loss: f32,
    /// Training throughput since the last logged step.
    pub tokens_per_s: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Training tokens seen so far.
    pub tokens: u64,
    /// Validation loss; present at evaluation steps.
    pub val_loss: Option<f32>,
}

impl MetricsLog {
    /// Appends one step's record (`val_loss` only at evaluation steps).
    pub fn write_step(&mut self, step: &StepRecord) -> Result<()> {
        let mut record = serde_json::json!({
            "step": step.step,
            "lr": step.lr,
            "train_loss": step.train_loss,
            "tokens_per_s": step.tokens_per_s.round(),
            "grad_norm": step.grad_norm,
            "tokens": step.tokens,
        });
        if let Some(val) = step.val_loss {
            record["val_loss"] = serde_json::json!(val);
        }
        self.write(&record)
    }
}

/// Draws the loss curves of `dir`'s metrics.jsonl into its loss.svg.
pub fn write_plot(dir: &Path) -> Result<()> {
    let (train, val) = read_curves(&dir.join(METRICS_FILE))?;
    write_atomic(&dir.join(PLOT_FILE), loss_svg(&train, &val).as_bytes())
}

/// (step, loss) points.
pub type Curve = Vec<(f64, f64)>;

/// The (step, loss) points of `train_loss` and `val_loss` in a metrics log.
pub fn read_curves(path: &Path) -> Result<(Curve, Curve)> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for line in text.lines() {
        let Ok(record) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let Some(step) = record.get("step").and_then(Value::as_f64) else {
            continue;
        };
        if let Some(loss) = record.get("train_loss").and_then(Value::as_f64) {
            train.push((step, loss));
        }
        if let Some(loss) = record.get("val_loss").and_then(Value::as_f64) {
            val.push((step, loss));
        }
    }
    Ok((train, val))
}

/// Draws train and validation loss against the step as an SVG line chart.
pub fn loss_svg(train: &[(f64, f64)], val: &[(f64, f64)]) -> String {
    const W: f64 = 640.0;
    const H: f64 = 400.0;
    const LEFT: f64 = 60.0;
    const RIGHT: f64 = 20.0;
    const TOP: f64 = 30.0;
    const BOTTOM: f64 = 50.0;
    let points = train.iter().chain(val).filter(|(_, y)| y.is_finite());
    let (mut x_max, mut y_min, mut y_max) = (1.0f64, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in points {
        x_max = x_max.max(x);
        y_min = y_min.min(y);
        y_max = y_max.max(y);
    }
    if !y_min.is_finite() {
        (y_min, y_max) = (0.0, 1.0);
    }
    if y_max - y_min < 1e-6 {
        y_max = y_min + 1.0;
    }
    let sx = |x: f64| LEFT + x / x_max * (W - LEFT - RIGHT);
    let sy = |y: f64| TOP + (y_max - y) / (y_max - y_min) * (H - TOP - BOTTOM);
    let polyline = |curve: &[(f64, f64)], color: &str| {
        let pts: Vec<String> = curve
            .iter()
            .filter(|(_, y)| y.is_finite())
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect();
        format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" points=\"{}\"/>\n",
            pts.join(" ")
        )
    };
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"{W}\" height=\"{H}\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"18\" text-anchor=\"middle\" font-size=\"14\">Loss (nats per token)</text>\n",
        W / 2.0
    );
    // Axes with five ticks each.
    svg += &format!(
        "<line x1=\"{LEFT}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n<line x1=\"{LEFT}\" y1=\"{TOP}\" x2=\"{LEFT}\" y2=\"{}\" stroke=\"black\"/>\n",
        H - BOTTOM, W - RIGHT, H - BOTTOM, H - BOTTOM
    );
    for i in 0..=4 {
        let x = x_max * i as f64 / 4.0;
        let y = y_min + (y_max - y_min) * i as f64 / 4.0;
        svg += &format!(
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{y:.2}</text>\n",
            sx(x), H - BOTTOM + 16.0, x.round(), LEFT - 6.0, sy(y) + 4.0
        );
    }
    svg += &format!(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">step</text>\n",
        W / 2.0,
        H - 12.0
    );
    svg += &polyline(train, "#1f77b4");
    svg += &polyline(val, "#d62728");
    svg += &format!(
        "<text x=\"{0}\" y=\"{1}\" fill=\"#1f77b4\" text-anchor=\"end\">train</text>\n<text x=\"{0}\" y=\"{2}\" fill=\"#d62728\" text-anchor=\"end\">validation</text>\n</svg>\n",
        W - RIGHT - 4.0, TOP + 14.0, TOP + 30.0
    );
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_cuts_the_log_back_and_the_plot_has_both_curves() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(METRICS_FILE);
        let mut log = MetricsLog::open(&path, None).unwrap();
        for step in 1..=5u64 {
            log.write(&serde_json::json!({"step": step, "train_loss": 5.0 - step as f64}))
                .unwrap();
        }
        log.write(&serde_json::json!({"step": 5, "val_loss": 1.5}))
            .unwrap();
        log.flush().unwrap();
        drop(log);
        let mut log = MetricsLog::open(&path, Some(3)).unwrap();
        log.write(&serde_json::json!({"step": 4, "train_loss": 0.5, "val_loss": 0.7}))
            .unwrap();
        log.flush().unwrap();
        let (train, val) = read_curves(&path).unwrap();
        assert_eq!(train, vec![(1.0, 4.0), (2.0, 3.0), (3.0, 2.0), (4.0, 0.5)]);
        assert_eq!(val, vec![(4.0, 0.7)]);
        let svg = loss_svg(&train, &val);
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("validation") && svg.ends_with("</svg>\n"));
    }
}
