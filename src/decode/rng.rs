//! The seeded random source of decoding: SplitMix64 (Steele, Lea and Flood 2014), one
//! stream per sample so that sample `i` is the same whether it is drawn alone or in a
//! batch, plus the Gumbel draws of stochastic beam search.

/// A SplitMix64 generator: small, fast and good enough for sampling tokens.
#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
}

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Rng { state: seed }
    }

    /// The generator of sample `index` under the global `seed`.
    pub fn for_sample(seed: u64, index: u64) -> Self {
        // Two rounds of mixing so that neighbouring (seed, index) pairs give unrelated streams.
        let mut mixer = Rng::new(seed ^ 0xd1b5_4a32_d192_ed03);
        let base = mixer.next_u64();
        Rng::new(base ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A uniform float in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// A standard Gumbel draw, -ln(-ln U) with U uniform in (0, 1).
    pub fn gumbel(&mut self) -> f64 {
        // Shift U off zero: ln(0) would give an infinite draw.
        let u = (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64) + f64::EPSILON;
        -(-u.min(1.0 - f64::EPSILON).ln()).ln()
    }
}
