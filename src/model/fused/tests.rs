//! Every kernel against the graph of primitive ops it replaces (candle's autograd
//! is the reference for the gradients), on random inputs.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var, D};

use super::attention::*;
use super::linear::*;
use super::norm::*;
use super::rows::*;
use super::scoring::*;
use super::swiglu::*;

fn randn(shape: &[usize], seed: u64) -> Var {
    // A fixed pseudo-random fill, so failures reproduce.
    let n: usize = shape.iter().product();
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let values: Vec<f32> = (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Var::from_vec(values, shape, &Device::Cpu).unwrap()
}

#[test]
fn scores_by_vocabulary_block_equal_the_whole_log_softmax() {
    // Three blocks of the vocabulary (4096, 4096, 1808 ids).
    let (n, c, vocab) = (7, 16, 10_000);
    let mut x = randn(&[n, c], 41).as_tensor().to_vec2::<f32>().unwrap();
    let mut w = randn(&[vocab, c], 42).as_tensor().to_vec2::<f32>().unwrap();
    // Row 0 reads column 0 alone, where ids 100 (first block) and 9000 (last) hold
    // the same, largest logit: the first of them is the argmax.
    x[0] = (0..c).map(|j| if j == 0 { 1.0 } else { 0.0 }).collect();
    w[100][0] = 10.0;
    w[9000][0] = 10.0;
    let x = Tensor::new(x, &Device::Cpu).unwrap();
    let w = Tensor::new(w, &Device::Cpu).unwrap();
    let targets = [9000, 4100, 9999, 100, 0, 4095, 8192];
    let got = projected_scores(&x, &w, &targets).unwrap().unwrap();
    let logits = x.matmul(&w.t().unwrap()).unwrap().to_vec2::<f32>().unwrap();
    for ((row, score), &target) in logits.iter().zip(&got).zip(&targets) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let log_norm = f64::from(max) + row.iter().map(|&l| f64::from(l - max).exp()).sum::<f64>().ln();
        let top_id = row.iter().position(|&l| l == max).unwrap();
        assert!((f64::from(score.logprob) - (f64::from(row[target as usize]) - log_norm)).abs() < 1e-5);
        assert!((f64::from(score.top_logprob) - (f64::from(max) - log_norm)).abs() < 1e-5);
        assert_eq!(score.top_id as usize, top_id);
    }
    assert_eq!(got[0].top_id, 100);
    // Within one block, the whole-row scoring exactly.
    let small = w.narrow(0, 0, 300).unwrap();
    let small_targets = [3, 299, 0, 150, 7, 100, 42];
    let blocked = projected_scores(&x, &small, &small_targets).unwrap().unwrap();
    let whole = score_rows(&x.matmul(&small.t().unwrap()).unwrap(), &small_targets).unwrap();
    for (a, b) in blocked.iter().zip(&whole) {
        assert_eq!((a.logprob, a.top_logprob, a.top_id), (b.logprob, b.top_logprob, b.top_id));
    }
    // A target outside the vocabulary is an error, not a read past the weight.
    assert!(projected_scores(&x, &small, &[300, 0, 0, 0, 0, 0, 0]).is_err());
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// Values of `fused(inputs)` and `reference(inputs)`, and the gradients of
/// `sum(out * probe)` with respect to every input, agree within `tol`.
fn check(
    inputs: &[Var],
    fused: impl Fn(&[Tensor]) -> Tensor,
    reference: impl Fn(&[Tensor]) -> Tensor,
    tol: f32,
) {
    let xs: Vec<Tensor> = inputs.iter().map(|v| v.as_tensor().clone()).collect();
    let (a, b) = (fused(&xs), reference(&xs));
    assert!(
        max_diff(&a, &b) < tol,
        "values differ by {}",
        max_diff(&a, &b)
    );
    let probe = randn(a.dims(), 99).as_tensor().clone();
    let ga = (a * &probe).unwrap().sum_all().unwrap().backward().unwrap();
    let gb = (b * &probe).unwrap().sum_all().unwrap().backward().unwrap();
    for (i, x) in xs.iter().enumerate() {
        let (da, db) = (ga.get(x).unwrap(), gb.get(x).unwrap());
        let diff = max_diff(da, db);
        assert!(diff < tol, "gradient of input {i} differs by {diff}");
    }
}

#[test]
fn log_softmax_rows_match_candle_and_normalise() {
    let logits = (randn(&[3, 1000], 40).as_tensor() * 8.0).unwrap();
    let ours = log_softmax_rows(&logits).unwrap();
    let reference = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap().to_vec2::<f32>().unwrap();
    for (row, expected) in ours.iter().zip(&reference) {
        let worst = row.iter().zip(expected).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-5, "log-probabilities differ by {worst}");
        let total: f64 = row.iter().map(|&lp| f64::from(lp).exp()).sum();
        assert!((total - 1.0).abs() < 1e-5, "probabilities sum to {total}");
    }
}

#[test]
fn cached_attention_matches_the_graph() {
    // Two batch rows, 4 query heads over 2 kv heads of width 8; 5 queries after 7
    // cached positions (two blocks of rows would need more than 64 queries, so a
    // second case has 70).
    for (t, offset) in [(5, 7), (70, 3)] {
        let (b, h, g, d) = (2, 4, 2, 8);
        let q = randn(&[b, h, t, d], 31).as_tensor().detach();
        let k = randn(&[b, g, offset + t, d], 32).as_tensor().detach();
        let v = randn(&[b, g, offset + t, d], 33).as_tensor().detach();
        let ours = cached_attention(&q, &k, &v, offset).unwrap().unwrap();
        let repeat = |x: &Tensor| {
            let (b, g, s, d) = x.dims4().unwrap();
            x.unsqueeze(2).unwrap().expand((b, g, h / g, s, d)).unwrap().reshape((b, h, s, d)).unwrap()
        };
        let scores = (q.matmul(&repeat(&k).t().unwrap()).unwrap() / (d as f64).sqrt()).unwrap();
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| (0..offset + t).map(move |j| if j > offset + i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (t, offset + t), &Device::Cpu).unwrap();
        let weights = candle_nn::ops::softmax(&scores.broadcast_add(&mask).unwrap(), D::Minus1).unwrap();
        let reference = weights
            .matmul(&repeat(&v).contiguous().unwrap())
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, t, h * d))
            .unwrap();
        let diff = max_diff(&ours, &reference);
        assert!(diff < 1e-5, "t {t}, offset {offset}: differs by {diff}");
    }
}

#[test]
fn rms_norm_matches_the_graph() {
    let inputs = [randn(&[3, 5, 16], 1), randn(&[16], 2)];
    let eps = 1e-5;
    check(
        &inputs,
        |x| rms_norm(&x[0], &x[1], eps).unwrap().unwrap(),
        |x| {
            let ms = x[0].sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
            let r = (ms + eps).unwrap().sqrt().unwrap();
            x[0].broadcast_div(&r)
                .unwrap()
                .broadcast_mul(&x[1])
                .unwrap()
        },
        1e-5,
    );
}

#[test]
fn swiglu_matches_the_graph() {
    let inputs = [randn(&[2, 7, 24], 3), randn(&[2, 7, 24], 4)];
    check(
        &inputs,
        |x| swiglu(&x[0], &x[1]).unwrap().unwrap(),
        |x| (x[0].silu().unwrap() * &x[1]).unwrap(),
        1e-6,
    );
}

#[test]
fn linear_matches_the_graph() {
    // Rows over two leading dimensions; the larger shape takes the parallel
    // products. The reference is candle's own product of x and W^T.
    for (dims, out, seed) in [([2, 5, 24], 13, 20), ([3, 40, 96], 70, 21)] {
        let inputs = [randn(&dims, seed), randn(&[out, dims[2]], seed + 10)];
        check(
            &inputs,
            |x| linear(&x[0], &x[1]).unwrap().expect("applies"),
            |x| x[0].broadcast_matmul(&x[1].t().unwrap()).unwrap(),
            1e-4,
        );
    }
    let weight = randn(&[4, 6], 22).as_tensor().clone();
    let wrong_width = randn(&[2, 5], 23).as_tensor().clone();
    assert!(linear(&wrong_width, &weight).unwrap().is_none());
}

#[test]
fn cross_entropy_matches_log_softmax_and_gather() {
    let logits = randn(&[10, 7], 5);
    let targets = Tensor::new(&[0u32, 6, 3, 3, 1, 2, 5, 4, 0, 6], &Device::Cpu).unwrap();
    check(
        &[logits],
        |x| {
            cross_entropy(&(&x[0] * 4.0).unwrap(), &targets)
                .unwrap()
                .unwrap()
        },
        |x| {
            let logprobs =
                candle_nn::ops::log_softmax(&(&x[0] * 4.0).unwrap(), D::Minus1).unwrap();
            let picked = logprobs.gather(&targets.unsqueeze(1).unwrap(), 1).unwrap();
            picked.mean_all().unwrap().neg().unwrap()
        },
        1e-5,
    );
}

#[test]
fn out_of_range_target_is_an_error() {
    let logits = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
    let targets = Tensor::new(&[0u32, 3], &Device::Cpu).unwrap();
    assert!(cross_entropy(&logits, &targets).is_err());
}

/// The unfused attention: split heads, rotate half, scores, causal mask, softmax,
/// weighted values, merge heads.
fn attention_graph(
    x: &[Tensor],
    h: usize,
    g: usize,
    d: usize,
    rope: Option<&(Tensor, Tensor)>,
    dropout_mask: Option<&Tensor>,
) -> Tensor {
    let (b, t, _) = x[0].dims3().unwrap();
    let split = |x: &Tensor, heads: usize| {
        x.reshape((b, t, heads, d))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
    };
    let rotate = |x: Tensor| match rope {
        None => x,
        Some((cos, sin)) => {
            let (x1, x2) = (
                x.narrow(3, 0, d / 2).unwrap(),
                x.narrow(3, d / 2, d / 2).unwrap(),
            );
            let first =
                (x1.broadcast_mul(cos).unwrap() - x2.broadcast_mul(sin).unwrap()).unwrap();
            let second =
                (x2.broadcast_mul(cos).unwrap() + x1.broadcast_mul(sin).unwrap()).unwrap();
            Tensor::cat(&[first, second], 3).unwrap()
        }
    };
    let repeat = |x: Tensor| {
        x.unsqueeze(2)
            .unwrap()
            .broadcast_as((b, g, h / g, t, d))
            .unwrap()
            .reshape((b, h, t, d))
            .unwrap()
    };
    let q = rotate(split(&x[0], h));
    let k = repeat(rotate(split(&x[1], g)));
    let v = repeat(split(&x[2], g));
    let scores = (q.matmul(&k.t().unwrap()).unwrap() / (d as f64).sqrt()).unwrap();
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    let mask = Tensor::from_vec(mask, (t, t), &Device::Cpu).unwrap();
    let probs =
        candle_nn::ops::softmax(&scores.broadcast_add(&mask).unwrap(), D::Minus1).unwrap();
    let probs = match dropout_mask {
        Some(m) => (probs * m).unwrap(),
        None => probs,
    };
    probs
        .matmul(&v)
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .reshape((b, t, h * d))
        .unwrap()
}

fn tables(t: usize, d: usize) -> (RopeTables, (Tensor, Tensor)) {
    let half = d / 2;
    let (mut cos, mut sin) = (Vec::new(), Vec::new());
    for p in 0..t {
        for i in 0..half {
            let angle = p as f32 / 10_000f32.powf(2.0 * i as f32 / d as f32);
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    let tensors = (
        Tensor::from_slice(&cos, (t, half), &Device::Cpu).unwrap(),
        Tensor::from_slice(&sin, (t, half), &Device::Cpu).unwrap(),
    );
    let host = RopeTables {
        cos: Arc::new(cos),
        sin: Arc::new(sin),
    };
    (host, tensors)
}

#[test]
fn attention_matches_the_graph_with_rope_and_gqa() {
    // 150 positions: blocks of queries, the last one short.
    let (b, d) = (2, 8);
    for (t, h, g, with_rope) in [(9, 4, 4, true), (9, 4, 2, true), (9, 3, 1, false), (150, 2, 1, true)] {
        let inputs = [
            randn(&[b, t, h * d], 10),
            randn(&[b, t, g * d], 11),
            randn(&[b, t, g * d], 12),
        ];
        let (host, tensors) = tables(t, d);
        check(
            &inputs,
            |x| {
                let rope = with_rope.then(|| host.clone());
                causal_attention(&x[0], &x[1], &x[2], (h, g, d), rope, None)
                    .unwrap()
                    .unwrap()
            },
            |x| attention_graph(x, h, g, d, with_rope.then_some(&tensors), None),
            1e-5,
        );
    }
}

#[test]
fn heads_match_a_transpose_then_candles_rope() {
    // The cache's layout: (b, t, heads * d) -> (b, heads, t, d), rotated by
    // candle-nn's own rotary kernel as the reference.
    let (b, t, h, d) = (2, 70, 3, 8);
    let xs = randn(&[b, t, h * d], 30).as_tensor().detach();
    let split = xs.reshape((b, t, h, d)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap();
    let (host, (cos, sin)) = tables(t, d);
    let rotated = candle_nn::rotary_emb::rope(&split, &cos, &sin).unwrap();
    let fused = heads(&xs, h, d, Some(host)).unwrap().unwrap();
    assert!(max_diff(&fused, &rotated) < 1e-6, "rotated heads differ by {}", max_diff(&fused, &rotated));
    let plain = heads(&xs, h, d, None).unwrap().unwrap();
    assert_eq!(max_diff(&plain, &split), 0.0);
    // A tensor that needs its gradient is left to the graph.
    assert!(heads(&randn(&[1, 2, 8], 31), 1, 8, None).unwrap().is_none());
}

#[test]
fn attention_dropout_matches_the_graph_with_the_same_mask() {
    // Values and gradients equal the graph's with the mask the kernel draws, and
    // about p of the causal weights are dropped.
    let (b, t, d, h, g) = (2, 70, 8, 4, 2);
    let dropout = AttentionDropout { p: 0.3, seed: 11 };
    let inputs = [
        randn(&[b, t, h * d], 20),
        randn(&[b, t, g * d], 21),
        randn(&[b, t, g * d], 22),
    ];
    let mut factors = vec![0f32; b * h * t * t];
    for (map, rows) in factors.chunks_exact_mut(t * t).enumerate() {
        for (i, row) in rows.chunks_exact_mut(t).enumerate() {
            for (j, f) in row.iter_mut().enumerate().take(i + 1) {
                *f = dropout.factor(map, t, i, j);
            }
        }
    }
    let causal = b * h * t * (t + 1) / 2;
    let dropped = causal - factors.iter().filter(|&&f| f > 0.0).count();
    let share = dropped as f64 / causal as f64;
    assert!((share - 0.3).abs() < 0.02, "dropped {share}");
    let mask = Tensor::from_vec(factors, (b, h, t, t), &Device::Cpu).unwrap();
    let (host, tensors) = tables(t, d);
    check(
        &inputs,
        |x| {
            causal_attention(&x[0], &x[1], &x[2], (h, g, d), Some(host.clone()), Some(dropout))
                .unwrap()
                .unwrap()
        },
        |x| attention_graph(x, h, g, d, Some(&tensors), Some(&mask)),
        1e-5,
    );
}

#[test]
fn few_rows_linear_matches_matmul_and_declines_other_shapes() {
    // Odd widths leave a tail after the last eight and an unpaired last column;
    // the larger weight takes the parallel path.
    for (n, k) in [(37, 24), (37, 27), (301, 517)] {
        let weight = randn(&[n, k], 30).as_tensor().detach();
        for rows in 1..=16 {
            let x = randn(&[1, rows, k], 31 + rows as u64).as_tensor().detach();
            let fast = few_rows_linear(&x, &weight).unwrap().expect("applies");
            let reference = x.broadcast_matmul(&weight.t().unwrap()).unwrap();
            assert!(max_diff(&fast, &reference) < 1e-4, "{rows} rows of {k} against {n}");
        }
    }
    let weight = randn(&[37, 24], 30).as_tensor().detach();
    let many = randn(&[1, 17, 24], 33).as_tensor().detach();
    assert!(few_rows_linear(&many, &weight).unwrap().is_none());
    let tracked = randn(&[1, 4, 24], 34);
    assert!(few_rows_linear(tracked.as_tensor(), &weight).unwrap().is_none());
}
