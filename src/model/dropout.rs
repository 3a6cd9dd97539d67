//! Seeded dropout (Srivastava et al. 2014) for training.
//!
//! candle's CPU random generator cannot be seeded, and our rule is that every random
//! source follows `--seed`; so masks come from a SplitMix64 stream on the host. Each
//! forward pass gets a seed (the trainer derives it from `--seed` and the step), and each
//! dropout site in the pass draws the next sub-seed, so a step is reproducible.

use std::cell::Cell;

use candle_core::Tensor;

use crate::rng::SplitMix64;

/// The random source of one training forward pass.
#[derive(Debug)]
pub struct DropoutRng {
    state: Cell<SplitMix64>,
}

impl DropoutRng {
    /// A stream for one forward pass; use a different seed for every step.
    pub fn new(seed: u64) -> Self {
        DropoutRng {
            state: Cell::new(SplitMix64::new(seed)),
        }
    }

    /// Where this pass's stream stands: a [`DropoutRng::new`] of it draws what this one
    /// draws next.
    pub(crate) fn position(&self) -> u64 {
        self.state.get().state
    }

    /// Moves the stream to `position` (as returned by [`DropoutRng::position`]).
    pub(crate) fn seek(&self, position: u64) {
        self.state.set(SplitMix64::new(position));
    }

    /// Hands out the next `n` draws of this pass's stream to a kernel that makes its own
    /// mask: returns the stream state they start from (see [`DropoutRng::mask_of_stream`]).
    pub(crate) fn take_stream(&self, n: usize) -> u64 {
        let start = self.position();
        self.seek(start.wrapping_add((n as u64).wrapping_mul(SplitMix64::GAMMA)));
        start
    }

    /// The dropout factors of `n` elements from draws `0..n` of the stream at `state`:
    /// 0 where the draw, as a 53-bit uniform in [0, 1), is below `p` (so `p` is honoured
    /// to double precision), else `1 / (1 - p)`.
    pub(crate) fn mask_of_stream(state: u64, p: f64, n: usize) -> Vec<f32> {
        (0..n as u64).map(|i| mask_factor(state, i, p)).collect()
    }

    /// A seed for a kernel that draws its own mask (the fused attention), the next
    /// word of this pass's stream.
    pub(crate) fn next_seed(&self) -> u64 {
        let mut rng = self.state.get();
        let seed = rng.next_u64();
        self.state.set(rng);
        seed
    }

    /// Zeroes each element with probability `p` and scales the rest by `1 / (1 - p)`.
    pub(crate) fn dropout(&self, xs: &Tensor, p: f64) -> candle_core::Result<Tensor> {
        if p <= 0.0 {
            return Ok(xs.clone());
        }
        let mask = Self::mask_of_stream(self.take_stream(xs.elem_count()), p, xs.elem_count());
        let mask = Tensor::from_vec(mask, xs.shape(), xs.device())?.to_dtype(xs.dtype())?;
        xs * mask
    }
}

/// The dropout factor of element `i` drawn from the stream at `state`: 0 when draw `i`,
/// as a 53-bit uniform in [0, 1), is below `p`, else `1 / (1 - p)`. Indexing the stream
/// lets a backward pass redraw the forward's mask.
#[inline(always)]
pub(crate) fn mask_factor(state: u64, i: u64, p: f64) -> f32 {
    if SplitMix64::nth_f64(state, i) < p {
        0.0
    } else {
        (1.0 / (1.0 - p)) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn same_seed_same_mask_and_expected_scale() {
        let xs = Tensor::ones((100, 100), candle_core::DType::F32, &Device::Cpu).unwrap();
        let a = DropoutRng::new(7).dropout(&xs, 0.25).unwrap();
        let b = DropoutRng::new(7).dropout(&xs, 0.25).unwrap();
        let c = DropoutRng::new(8).dropout(&xs, 0.25).unwrap();
        let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(a, b.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        assert_ne!(a, c.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        let kept = a.iter().filter(|&&v| v > 0.0).count() as f64 / 10_000.0;
        assert!((kept - 0.75).abs() < 0.02, "kept {kept}");
        let mean: f64 = a.iter().map(|&v| v as f64).sum::<f64>() / 10_000.0;
        assert!((mean - 1.0).abs() < 0.03, "mean {mean}");
    }
}
