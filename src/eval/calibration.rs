//! Calibration: does a model's confidence match its accuracy? (Guo et al. 2017, "On
//! Calibration of Modern Neural Networks".)
//!
//! Confidences are sorted into `n` equal-width bins over [0, 1]; bin `i` holds the
//! confidences in the interval (i/n, (i+1)/n], and a confidence of exactly 0 joins the
//! first bin. Expected calibration error is the count-weighted mean gap between a bin's
//! accuracy and its mean confidence, ECE = sum_b (|B_b| / N) |acc(B_b) - conf(B_b)|
//! (Guo et al., eq. 3; torchmetrics' `CalibrationError` with norm "l1"); maximum
//! calibration error is the largest gap of a non-empty bin (eq. 5, norm "max").

use crate::{Error, Result};

/// One confidence bin.
#[derive(Debug, Clone, PartialEq)]
pub struct Bin {
    /// Lower edge (exclusive, except for the first bin).
    pub lower: f64,
    /// Upper edge (inclusive).
    pub upper: f64,
    /// Predictions whose confidence falls in the bin.
    pub count: usize,
    /// Share of them that were correct (NaN when empty).
    pub accuracy: f64,
    /// Their mean confidence (NaN when empty).
    pub confidence: f64,
}

/// Calibration of a set of predictions.
#[derive(Debug, Clone, PartialEq)]
pub struct Calibration {
    /// Predictions measured.
    pub samples: usize,
    /// Share of them that were correct.
    pub accuracy: f64,
    /// Their mean confidence.
    pub confidence: f64,
    /// Expected calibration error.
    pub ece: f64,
    /// Maximum calibration error.
    pub mce: f64,
    /// The bins, lowest confidence first.
    pub bins: Vec<Bin>,
}

impl Calibration {
    /// Measures `(confidence, correct)` pairs over `bins` equal-width bins.
    pub fn new(samples: impl IntoIterator<Item = (f64, bool)>, bins: usize) -> Result<Self> {
        if bins == 0 {
            return Err(Error::Invalid(
                "--bins 0: calibration needs at least one bin".into(),
            ));
        }
        let mut counts = vec![0usize; bins];
        let mut correct = vec![0usize; bins];
        let mut confidence_sums = vec![0f64; bins];
        for (confidence, is_correct) in samples {
            if !(0.0..=1.0).contains(&confidence) {
                return Err(Error::Invalid(format!(
                    "confidence {confidence} is not a probability in [0, 1]"
                )));
            }
            let bin = bin_of(confidence, bins);
            counts[bin] += 1;
            correct[bin] += usize::from(is_correct);
            confidence_sums[bin] += confidence;
        }
        let total: usize = counts.iter().sum();
        if total == 0 {
            return Err(Error::Invalid(
                "calibration needs at least one prediction".into(),
            ));
        }
        let mut ece = 0.0;
        let mut mce = 0.0f64;
        let bins: Vec<Bin> = (0..bins)
            .map(|i| {
                let count = counts[i];
                let accuracy = correct[i] as f64 / count as f64;
                let confidence = confidence_sums[i] / count as f64;
                if count > 0 {
                    let gap = (accuracy - confidence).abs();
                    ece += count as f64 / total as f64 * gap;
                    mce = mce.max(gap);
                }
                Bin {
                    lower: i as f64 / bins as f64,
                    upper: (i + 1) as f64 / bins as f64,
                    count,
                    accuracy,
                    confidence,
                }
            })
            .collect();
        Ok(Calibration {
            samples: total,
            accuracy: correct.iter().sum::<usize>() as f64 / total as f64,
            confidence: confidence_sums.iter().sum::<f64>() / total as f64,
            ece,
            mce,
            bins,
        })
    }
}

/// The bin of `confidence` among `bins` intervals (i/n, (i+1)/n].
fn bin_of(confidence: f64, bins: usize) -> usize {
    // ceil(c * n) - 1 is the interval whose upper edge is the first at or above c.
    let scaled = (confidence * bins as f64).ceil() as usize;
    scaled.saturating_sub(1).min(bins - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ece_and_mce_match_the_values_worked_by_hand() {
        // 5 bins of width 0.2. (0.2, 0.4]: 0.3 wrong -> acc 0, conf 0.3, gap 0.3.
        // (0.6, 0.8]: 0.7 right, 0.8 wrong -> acc 0.5, conf 0.75, gap 0.25.
        // (0.8, 1.0]: 0.9 right, 0.95 right, 1.0 wrong -> acc 2/3, conf 0.95, gap 0.28333.
        // ECE = (1 * 0.3 + 2 * 0.25 + 3 * 0.283333) / 6 = 1.65 / 6 = 0.275; MCE = 0.3.
        let pairs = [
            (0.3, false),
            (0.7, true),
            (0.8, false),
            (0.9, true),
            (0.95, true),
            (1.0, false),
        ];
        let cal = Calibration::new(pairs, 5).unwrap();
        assert!((cal.ece - 0.275).abs() < 1e-12, "{}", cal.ece);
        assert!((cal.mce - 0.3).abs() < 1e-12, "{}", cal.mce);
        let counts: Vec<usize> = cal.bins.iter().map(|b| b.count).collect();
        assert_eq!(counts, [0, 1, 0, 2, 3]);
        assert!((cal.accuracy - 0.5).abs() < 1e-12);
    }

    #[test]
    fn upper_edges_are_inclusive() {
        assert_eq!(bin_of(0.2, 5), 0);
        assert_eq!(bin_of(0.2000001, 5), 1);
        assert_eq!(bin_of(0.0, 5), 0);
        assert_eq!(bin_of(1.0, 5), 4);
    }

    #[test]
    fn a_perfectly_calibrated_set_has_zero_error() {
        let pairs = [(0.5, true), (0.5, false), (1.0, true)];
        let cal = Calibration::new(pairs, 10).unwrap();
        assert!(cal.ece.abs() < 1e-12 && cal.mce.abs() < 1e-12);
    }

    #[test]
    fn zero_bins_and_no_samples_are_errors() {
        assert!(Calibration::new([(0.5, true)], 0).is_err());
        assert!(Calibration::new([], 3).is_err());
        assert!(Calibration::new([(1.5, true)], 3).is_err());
    }
}
