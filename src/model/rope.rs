//! Position encodings: rotary embeddings (Su et al. 2021, "RoFormer"), and the absolute
//! encodings added to the token embeddings, sinusoidal (Vaswani et al. 2017, section 3.5)
//! or learned.
//!
//! RoPE uses `transformers`' "rotate half" layout: feature `i` of a head is paired with
//! feature `i + head_dim/2` (not with its neighbour, as in the paper and in Meta's
//! original code), and the pair at frequency `theta^(-2i/head_dim)` is rotated by
//! `position * frequency`. Tables are computed once, for `max_position_embeddings`
//! positions, in f32 as `transformers` does, then cast to the model's dtype.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::{Init, VarBuilder};

use super::config::{ModelConfig, PositionKind};
use super::fused::RopeTables;

/// Rotary position embedding tables, shared by every attention layer.
#[derive(Debug, Clone)]
pub(crate) struct Rotary {
    /// cos(position * frequency): (max_positions, head_dim / 2).
    cos: Tensor,
    /// sin(position * frequency): (max_positions, head_dim / 2).
    sin: Tensor,
    /// The same tables in host memory for the fused CPU attention; `None` unless f32.
    host: Option<RopeTables>,
}

impl Rotary {
    /// Builds the tables for `cfg.max_position_embeddings` positions.
    pub(crate) fn new(
        cfg: &ModelConfig,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let half = cfg.head_size() / 2;
        let positions = cfg.max_position_embeddings;
        // f32 like transformers' `inv_freq`, so angles round the same way.
        let theta = cfg.rope_theta as f32;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / theta.powf((2 * i) as f32 / (2 * half) as f32))
            .collect();
        let mut cos = Vec::with_capacity(positions * half);
        let mut sin = Vec::with_capacity(positions * half);
        for position in 0..positions {
            for &freq in &inv_freq {
                let angle = (position as f32 * freq) as f64;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        let host = (dtype == DType::F32 && device.is_cpu()).then(|| RopeTables {
            cos: Arc::new(cos.clone()),
            sin: Arc::new(sin.clone()),
        });
        let cos = Tensor::from_vec(cos, (positions, half), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (positions, half), device)?.to_dtype(dtype)?;
        Ok(Rotary { cos, sin, host })
    }

    /// The tables in host memory, for the fused CPU attention (f32 CPU models only).
    pub(crate) fn host_tables(&self) -> Option<RopeTables> {
        self.host.clone()
    }

    /// Rotates queries or keys whose first position is `offset`.
    pub(crate) fn apply(&self, xs: &Tensor, offset: usize) -> candle_core::Result<Tensor> {
        let (_b, _h, t, _d) = xs.dims4()?; // (b, h, t, d)
        let cos = self.cos.narrow(0, offset, t)?; // (t, d/2)
        let sin = self.sin.narrow(0, offset, t)?; // (t, d/2)
        // The fused kernel has no backward pass; training takes the graph form.
        if xs.track_op() {
            return rotate_half_graph(xs, &cos, &sin);
        }
        candle_nn::rotary_emb::rope(&xs.contiguous()?, &cos, &sin)
    }
}

/// `x * cos + rotate_half(x) * sin` from primitive, differentiable ops.
fn rotate_half_graph(xs: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let half = xs.dim(D::Minus1)? / 2;
    let x1 = xs.narrow(D::Minus1, 0, half)?; // (b, h, t, d/2)
    let x2 = xs.narrow(D::Minus1, half, half)?; // (b, h, t, d/2)
    let first = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
    let second = (x2.broadcast_mul(cos)? + x1.broadcast_mul(sin)?)?;
    Tensor::cat(&[first, second], D::Minus1) // (b, h, t, d)
}

/// The fixed table of Vaswani et al. 2017: PE(p, 2i) = sin(p / 10000^(2i/c)),
/// PE(p, 2i+1) = cos(p / 10000^(2i/c)); shape (positions, c).
pub(crate) fn sinusoidal_table(
    positions: usize,
    width: usize,
    dtype: DType,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let mut table = Vec::with_capacity(positions * width);
    for position in 0..positions {
        for i in 0..width / 2 {
            let angle = position as f64 / 10_000f64.powf((2 * i) as f64 / width as f64);
            table.push(angle.sin() as f32);
            table.push(angle.cos() as f32);
        }
    }
    Tensor::from_vec(table, (positions, width), device)?.to_dtype(dtype)
}

/// An absolute position encoding added to the token embeddings.
#[derive(Debug, Clone)]
pub(crate) struct AddedPositions {
    /// One row per position: (max_positions, c).
    table: Tensor,
    /// Whether `table` is a parameter (`model.embed_positions.weight`).
    learned: bool,
}

impl AddedPositions {
    /// The table `cfg.position` asks for, or `None` for RoPE and no encoding.
    /// `vb` is the `model` prefix: the learned table is `model.embed_positions.weight`.
    pub(crate) fn load(vb: VarBuilder, cfg: &ModelConfig) -> candle_core::Result<Option<Self>> {
        let shape = (cfg.max_position_embeddings, cfg.hidden_size);
        match cfg.position {
            PositionKind::Rope | PositionKind::None => Ok(None),
            PositionKind::Sinusoidal => Ok(Some(AddedPositions {
                table: sinusoidal_table(shape.0, shape.1, vb.dtype(), vb.device())?,
                learned: false,
            })),
            PositionKind::Learned => {
                let init = Init::Randn {
                    mean: 0.0,
                    stdev: cfg.initializer_range,
                };
                Ok(Some(AddedPositions {
                    table: vb
                        .pp("embed_positions")
                        .get_with_hints(shape, "weight", init)?,
                    learned: true,
                }))
            }
        }
    }

    /// The parameter, if learned, under its HF-style name.
    pub(crate) fn named_tensors(&self, out: &mut Vec<(String, Tensor)>) {
        if self.learned {
            out.push((
                "model.embed_positions.weight".to_string(),
                self.table.clone(),
            ));
        }
    }

    /// Adds the encodings of positions `offset..offset + t` to `xs`.
    pub(crate) fn add(&self, xs: &Tensor, offset: usize) -> candle_core::Result<Tensor> {
        let (_b, t, _c) = xs.dims3()?; // (b, t, c)
        let rows = self.table.narrow(0, offset, t)?; // (t, c)
        xs.broadcast_add(&rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fused_and_graph_rotations_agree_at_an_offset() {
        let dev = Device::Cpu;
        let cfg = ModelConfig {
            max_position_embeddings: 64,
            ..Default::default()
        };
        let rotary = Rotary::new(&cfg, DType::F32, &dev).unwrap();
        let xs = Tensor::randn(0f32, 1.0, (2, 4, 5, 32), &dev).unwrap();
        let fused = rotary.apply(&xs, 7).unwrap();
        let cos = rotary.cos.narrow(0, 7, 5).unwrap();
        let sin = rotary.sin.narrow(0, 7, 5).unwrap();
        let graph = rotate_half_graph(&xs, &cos, &sin).unwrap();
        let diff = (fused - graph).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-6);
    }

    #[test]
    fn rotation_preserves_norm_and_relative_angle() {
        // <R(p) q, R(s) k> depends only on p - s: the property RoPE is built for.
        let dev = Device::Cpu;
        let cfg = ModelConfig {
            max_position_embeddings: 64,
            ..Default::default()
        };
        let rotary = Rotary::new(&cfg, DType::F32, &dev).unwrap();
        let q = Tensor::randn(0f32, 1.0, (1, 1, 1, 32), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (1, 1, 1, 32), &dev).unwrap();
        let dot = |p: usize, s: usize| {
            let a = rotary.apply(&q, p).unwrap();
            let b = rotary.apply(&k, s).unwrap();
            (a * b)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert!((dot(3, 1) - dot(12, 10)).abs() < 1e-4);
        let norm = |x: &Tensor| {
            x.sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert!((norm(&rotary.apply(&q, 9).unwrap()) - norm(&q)).abs() < 1e-4);
    }

    #[test]
    fn sinusoidal_table_matches_the_paper() {
        let table = sinusoidal_table(4, 6, DType::F32, &Device::Cpu).unwrap();
        let rows = table.to_vec2::<f32>().unwrap();
        assert_eq!(rows[0], vec![0.0, 1.0, 0.0, 1.0, 0.0, 1.0]);
        let p = 3.0f64;
        let want_2 = (p / 10_000f64.powf(2.0 / 6.0)).sin() as f32;
        assert!((rows[3][2] - want_2).abs() < 1e-7);
    }
}
