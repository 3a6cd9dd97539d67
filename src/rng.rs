//! SplitMix64 (Steele, Lea and Flood 2014): the one seeded random source behind every
//! random choice in `nlp` (subword regularization, training batches, initialisation and
//! dropout, sampling tokens), so the same `--seed` gives the same result. Its whole state
//! is one word, which checkpoints store to resume a stream exactly.

/// A SplitMix64 generator: a full-period counter through a mixing function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitMix64 {
    /// The whole state; saved in training checkpoints.
    pub state: u64,
}

impl SplitMix64 {
    /// The increment of the state per draw (the golden ratio as a 64-bit fraction).
    pub const GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

    /// A generator whose stream is fixed by `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    /// The generator of stream `index` under `seed` (sample `i` of a generation), so a
    /// stream is the same whether it is drawn alone or beside others.
    pub fn for_sample(seed: u64, index: u64) -> Self {
        // Two rounds of mixing so that neighbouring (seed, index) pairs give unrelated streams.
        let base = SplitMix64::new(seed ^ 0xd1b5_4a32_d192_ed03).next_u64();
        SplitMix64::new(base ^ index.wrapping_mul(Self::GAMMA))
    }

    /// Output `n` of the stream of `seed` (what the `n + 1`-th [`SplitMix64::next_u64`]
    /// returns), computed directly: a kernel that must redraw the same numbers in
    /// another pass (attention dropout's backward) indexes the stream.
    pub fn nth(seed: u64, n: u64) -> u64 {
        SplitMix64::new(seed.wrapping_add(n.wrapping_mul(Self::GAMMA))).next_u64()
    }

    /// Output `n` of the stream of `seed` as a uniform float in [0, 1), as
    /// [`SplitMix64::next_f64`] would give it.
    pub fn nth_f64(seed: u64, n: u64) -> f64 {
        (Self::nth(seed, n) >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(Self::GAMMA);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A uniform float in [0, 1) with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// A uniform integer in `0..n` (Lemire's multiply-shift; the bias is below 2^-32 for our n).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// A standard Gumbel draw, -ln(-ln U) with U uniform in (0, 1).
    pub fn gumbel(&mut self) -> f64 {
        // Shift U off zero: ln(0) would give an infinite draw.
        let u = self.next_f64() + f64::EPSILON;
        -(-u.min(1.0 - f64::EPSILON).ln()).ln()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_outputs_are_the_reference_splitmix64_values() {
        // The published test vector for seed 1234567.
        let mut rng = SplitMix64::new(1234567);
        let expected = [
            6457827717110365317_u64,
            3203168211198807973,
            9817491932198370423,
            4593380528125082431,
            16408922859458223821,
        ];
        for value in expected {
            assert_eq!(rng.next_u64(), value);
        }
    }

    #[test]
    fn nth_indexes_the_stream() {
        let mut rng = SplitMix64::new(42);
        for n in 0..5 {
            assert_eq!(SplitMix64::nth(42, n), rng.next_u64());
        }
    }

    #[test]
    fn below_and_next_f64_stay_in_range() {
        let mut rng = SplitMix64::new(9);
        for _ in 0..10_000 {
            assert!(rng.below(7) < 7);
            let u = rng.next_f64();
            assert!((0.0..1.0).contains(&u));
        }
    }
}
