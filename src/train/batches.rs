//! Random contiguous training windows, as nanoGPT's `get_batch`: each sequence starts at
//! a uniformly drawn offset, its targets are the same window shifted by one token.
//!
//! The generator is SplitMix64 (Steele et al. 2014) seeded from the run's seed; its one
//! word of state is the data position a checkpoint stores, so a resumed run draws the
//! same batches an uninterrupted one would.

use candle_core::{Device, Tensor};

use super::token_file::TokenFile;
use crate::rng::SplitMix64;
use crate::Result;

/// Mixes a seed with a stream label, so independent streams (batches, evaluation,
/// dropout, initialisation) never share a sequence.
pub fn derive_seed(seed: u64, label: u64) -> u64 {
    SplitMix64::new(seed ^ label.wrapping_mul(0xD6E8_FEB8_6659_FD93)).next_u64()
}

/// One micro-batch: inputs and next-token targets, both (batch, seq_len) u32.
#[derive(Debug)]
pub struct Batch {
    /// Token ids (b, t).
    pub inputs: Tensor,
    /// The ids that follow each input position (b, t).
    pub targets: Tensor,
}

/// Draws `batch_size` windows of `seq_len + 1` tokens from `tokens`.
pub fn sample_batch(
    tokens: &TokenFile,
    batch_size: usize,
    seq_len: usize,
    rng: &mut SplitMix64,
    device: &Device,
) -> Result<Batch> {
    let starts = tokens.len() - seq_len; // the caller checked len > seq_len
    let mut window = vec![0u32; seq_len + 1];
    let mut inputs = Vec::with_capacity(batch_size * seq_len);
    let mut targets = Vec::with_capacity(batch_size * seq_len);
    for _ in 0..batch_size {
        let start = rng.below(starts as u64) as usize;
        tokens.read_into(start, &mut window);
        inputs.extend_from_slice(&window[..seq_len]);
        targets.extend_from_slice(&window[1..]);
    }
    Ok(Batch {
        inputs: Tensor::from_vec(inputs, (batch_size, seq_len), device)?,
        targets: Tensor::from_vec(targets, (batch_size, seq_len), device)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::token_file::{write_token_file, TokenDtype};

    #[test]
    fn windows_are_contiguous_and_seeded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.bin");
        let ids: Vec<u32> = (0..500).collect();
        write_token_file(&path, &ids, TokenDtype::U16).unwrap();
        let file = TokenFile::open(&path).unwrap();
        let mut rng = SplitMix64::new(3);
        let batch = sample_batch(&file, 4, 8, &mut rng, &Device::Cpu).unwrap();
        let inputs = batch.inputs.to_vec2::<u32>().unwrap();
        let targets = batch.targets.to_vec2::<u32>().unwrap();
        for (x, y) in inputs.iter().zip(&targets) {
            for i in 0..8 {
                assert_eq!(x[i] + 1, y[i]);
                assert_eq!(x[0] + i as u32, x[i]);
            }
            assert!(y[7] < 500);
        }
        let mut again = SplitMix64::new(3);
        let same = sample_batch(&file, 4, 8, &mut again, &Device::Cpu).unwrap();
        assert_eq!(same.inputs.to_vec2::<u32>().unwrap(), inputs);
        assert_eq!(rng, again);
    }
}
