//! Learning-rate schedules as pure functions of the step, so a resumed run needs no
//! schedule state.
//!
//! All start with a linear warm-up from 0 to `lr` (Goyal et al. 2017). Then:
//! `cosine` decays to `min_lr` along half a cosine over the remaining steps (Loshchilov &
//! Hutter 2017, SGDR, without restarts; nanoGPT's `get_lr`); `constant` stays at `lr`;
//! `wsd` (warm-up, stable, decay; Hu et al. 2024, MiniCPM) holds `lr` and decays linearly
//! to `min_lr` over the last `decay_fraction` of the steps.

/// Which curve follows the warm-up.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Schedule {
    /// Half a cosine from `lr` to `min_lr`.
    Cosine,
    /// `lr` throughout.
    Constant,
    /// `lr`, then a linear decay to `min_lr` over this share of all steps.
    WarmupStableDecay { decay_fraction: f64 },
}

/// The learning rate of every step of one run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    /// The curve after warm-up.
    pub schedule: Schedule,
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate.
    pub min_lr: f64,
    /// Warm-up steps.
    pub warmup_steps: u64,
    /// Total steps.
    pub total_steps: u64,
}

impl LrSchedule {
    /// The learning rate of optimiser step `step` (0-based).
    pub fn at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            // (step + 1) so the first step does not waste itself at lr = 0 (nanoGPT).
            return self.lr * (step + 1) as f64 / (self.warmup_steps + 1) as f64;
        }
        match self.schedule {
            Schedule::Constant => self.lr,
            Schedule::Cosine => {
                let span = self.total_steps.saturating_sub(self.warmup_steps).max(1);
                let progress = ((step - self.warmup_steps) as f64 / span as f64).min(1.0);
                let coeff = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
                self.min_lr + coeff * (self.lr - self.min_lr)
            }
            Schedule::WarmupStableDecay { decay_fraction } => {
                let decay_steps = ((self.total_steps as f64) * decay_fraction).round() as u64;
                let decay_start = self
                    .total_steps
                    .saturating_sub(decay_steps)
                    .max(self.warmup_steps);
                if step < decay_start || decay_steps == 0 {
                    return self.lr;
                }
                let progress = ((step - decay_start + 1) as f64 / decay_steps as f64).min(1.0);
                self.lr + progress * (self.min_lr - self.lr)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(kind: Schedule) -> LrSchedule {
        LrSchedule {
            schedule: kind,
            lr: 1e-3,
            min_lr: 1e-4,
            warmup_steps: 100,
            total_steps: 2000,
        }
    }

    #[test]
    fn warmup_then_cosine_to_min_lr() {
        let s = schedule(Schedule::Cosine);
        assert!((s.at(0) - 1e-3 / 101.0).abs() < 1e-12);
        assert!((s.at(99) - 1e-3 * 100.0 / 101.0).abs() < 1e-12);
        assert!((s.at(100) - 1e-3).abs() < 1e-12);
        // Half way through the decay the cosine is at the mean of lr and min_lr.
        assert!((s.at(1050) - 5.5e-4).abs() < 1e-9);
        assert!((s.at(2000) - 1e-4).abs() < 1e-12);
        assert!((s.at(5000) - 1e-4).abs() < 1e-12);
        for step in 100..2000 {
            assert!(s.at(step + 1) <= s.at(step));
        }
    }

    #[test]
    fn constant_and_wsd() {
        assert_eq!(schedule(Schedule::Constant).at(1500), 1e-3);
        let s = schedule(Schedule::WarmupStableDecay {
            decay_fraction: 0.2,
        });
        assert_eq!(s.at(1599), 1e-3);
        assert!(s.at(1600) < 1e-3);
        assert!((s.at(1999) - 1e-4).abs() < 1e-12);
    }
}
