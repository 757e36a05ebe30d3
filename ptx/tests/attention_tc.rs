//! The fused tensor-core attention forward (`attention_tc_forward`) on the simulator against
//! dinovmf-core's `attention_forward` in f64 on the same bf16 `qkv`, at token counts that are
//! not multiples of the 64-row tile and every supported head size (16, 32, 48, 64), outputs
//! NaN-poisoned.
//!
//! Tolerance: the kernel rounds the probabilities `P` to bf16 before `P V` (relative error
//! 2^-9 each, and it normalises by the sum of the rounded values), so `|out - want| <= 2^-8
//! max |v| + 1e-5`; the row log-sum-exp `lse` likewise within 2^-8.
mod common;
use common::*;
use dinovmf_core::ops;
use dinovmf_ptx::elem::Bf16;
use dinovmf_ptx::kernels::attention_tc::{attention_tc_forward, ATT_BLOCK, SMEM_ATT_WORDS};
use dinovmf_ptx::kernels::attention_tc_backward::{
    attention_tc_backward_kv, attention_tc_backward_q, attention_tc_delta, SMEM_ATT_BWD_WORDS,
};
use dinovmf_ptx::sim::{self, SimOptions};

#[test]
fn tc_attention_forward_matches_core_f64() {
    let mut r = rng(51);
    for (case, &(bsz, t, d, heads)) in [
        (2, 37, 64, 4),
        (1, 70, 128, 2),
        (2, 5, 96, 3),
        (1, 130, 48, 1),
    ]
    .iter()
    .enumerate()
    {
        let qkv: Vec<Bf16> = rand_vec(&mut r, bsz * t * 3 * d, -1.0, 1.0)
            .iter()
            .map(|&v| Bf16::from_f32(v))
            .collect();
        let mut out = poison(bsz * t * d);
        let mut lse = poison(bsz * heads * t);
        let opts = if case % 2 == 0 {
            SimOptions::exhaustive()
        } else {
            SimOptions::shuffled(case as u64)
        };
        let grid = [t.div_ceil(64) as u32, (bsz * heads) as u32, 1];
        sim::launch_with(grid, ATT_BLOCK, SMEM_ATT_WORDS, &opts, |b| {
            attention_tc_forward(b, &mut out, &mut lse, &qkv, bsz, t, d, heads)
        });
        let q64: Vec<f64> = qkv.iter().map(|v| v.to_f32() as f64).collect();
        let mut want = vec![0f64; bsz * t * d];
        let mut att = vec![0f64; bsz * heads * t * t];
        ops::attention_forward(&mut want, &mut att, &q64, None, bsz, t, d, heads);
        let what = format!("attention B{bsz} T{t} D{d} H{heads} (atol 2^-8)");
        assert_close(&what, &out, &want, 0.0, 1.0 / 256.0 + 1e-5);
        // lse[b, h, i] = ln Σ_j exp(s_ij) of the scaled scores, from q and k directly.
        let hd = d / heads;
        let mut want_lse = vec![0f64; bsz * heads * t];
        for b in 0..bsz {
            for h in 0..heads {
                for i in 0..t {
                    let s: Vec<f64> = (0..t)
                        .map(|j| {
                            let mut acc = 0.0;
                            for c in 0..hd {
                                acc += q64[(b * t + i) * 3 * d + h * hd + c]
                                    * q64[(b * t + j) * 3 * d + d + h * hd + c];
                            }
                            acc / (hd as f64).sqrt()
                        })
                        .collect();
                    let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    want_lse[(b * heads + h) * t + i] =
                        mx + s.iter().map(|v| (v - mx).exp()).sum::<f64>().ln();
                }
            }
        }
        assert_close(
            "attention lse (atol 2^-8)",
            &lse,
            &want_lse,
            0.0,
            1.0 / 256.0,
        );
    }
}

/// The forward (kernel) then the three backward kernels on the simulator, against core's
/// `attention_forward` + `attention_backward` in f64 on the same bf16 `qkv` and a `dout` whose
/// values are bf16 numbers (so the kernels' rounding of `dout` is exact); prints the largest
/// error relative to the largest reference value of each of dq, dk, dv.
fn check_attention_backward(case: usize, bsz: usize, t: usize, d: usize, heads: usize) {
    let mut r = rng(61 + case as u64);
    let qkv: Vec<Bf16> = rand_vec(&mut r, bsz * t * 3 * d, -1.0, 1.0)
        .iter()
        .map(|&v| Bf16::from_f32(v))
        .collect();
    let dout: Vec<f32> = rand_vec(&mut r, bsz * t * d, -1.0, 1.0)
        .iter()
        .map(|&v| Bf16::from_f32(v).to_f32())
        .collect();
    let opts = if case.is_multiple_of(2) {
        SimOptions::exhaustive()
    } else {
        SimOptions::shuffled(case as u64)
    };
    let grid = [t.div_ceil(64) as u32, (bsz * heads) as u32, 1];
    let mut out = poison(bsz * t * d);
    let mut lse = poison(bsz * heads * t);
    sim::launch_with(grid, ATT_BLOCK, SMEM_ATT_WORDS, &opts, |b| {
        attention_tc_forward(b, &mut out, &mut lse, &qkv, bsz, t, d, heads)
    });
    let mut delta = poison(bsz * heads * t);
    let n = bsz * heads * t;
    sim::launch_with([n.div_ceil(256) as u32, 1, 1], 256, 0, &opts, |b| {
        attention_tc_delta(b, &mut delta, &out, &dout, bsz, t, d, heads)
    });
    let mut dqkv = poison(bsz * t * 3 * d);
    sim::launch_with(grid, ATT_BLOCK, SMEM_ATT_BWD_WORDS, &opts, |b| {
        attention_tc_backward_kv(b, &mut dqkv, &qkv, &dout, &lse, &delta, bsz, t, d, heads)
    });
    sim::launch_with(grid, ATT_BLOCK, SMEM_ATT_BWD_WORDS, &opts, |b| {
        attention_tc_backward_q(b, &mut dqkv, &qkv, &dout, &lse, &delta, bsz, t, d, heads)
    });
    let q64: Vec<f64> = qkv.iter().map(|v| v.to_f32() as f64).collect();
    let mut o64 = vec![0f64; bsz * t * d];
    let mut att = vec![0f64; bsz * heads * t * t];
    ops::attention_forward(&mut o64, &mut att, &q64, None, bsz, t, d, heads);
    let mut want = vec![0f64; bsz * t * 3 * d];
    ops::attention_backward(&mut want, &to_f64(&dout), &q64, &att, bsz, t, d, heads);
    // Per part (q, k, v columns): |err| <= 2^-7 max |want part| (see the test's doc).
    for (part, name) in ["dq", "dk", "dv"].iter().enumerate() {
        let idx: Vec<usize> = (0..want.len())
            .filter(|i| (i % (3 * d)) / d == part)
            .collect();
        let g: Vec<f32> = idx.iter().map(|&i| dqkv[i]).collect();
        let w: Vec<f64> = idx.iter().map(|&i| want[i]).collect();
        let top = w.iter().fold(0f64, |a, v| a.max(v.abs()));
        let what = format!(
            "attention backward {name} B{bsz} T{t} D{d} H{heads} (atol 2^-7 max|want| = {:e})",
            top / 128.0
        );
        let worst = assert_close(&what, &g, &w, 0.0, top / 128.0);
        eprintln!("{what}: worst |err| / max|want| = {:.2e}", worst / top);
    }
}

/// The fused backward at the ViT's awkward token counts (17 = 4 x 4 patches + [CLS], 65, 197)
/// with head sizes 32 and 64: partial query and key tiles, one and several tiles, both the
/// fixed and a shuffled block / thread order, outputs NaN-poisoned.
///
/// Tolerance: the kernels round `P` and `dS` to bf16 (relative 2^-9 each) before their
/// products and take `delta` from the forward's `out` (itself within 2^-8 max |v|), so each
/// gradient is within a few 2^-9 of its scale (measured: at most 2.4e-3 = 1.2 x 2^-9 of
/// max |want| over these cases); 2^-7 max |want| per part leaves 3x room for the sums over up
/// to 197 terms of random sign while a wrong index, a missed tile or a lost scale factor
/// (errors of order max |want|) fails.
#[test]
fn tc_attention_backward_matches_core_f64() {
    for (case, &(bsz, t, d, heads)) in [
        (2, 17, 64, 2),
        (1, 65, 64, 1),
        (1, 197, 64, 2),
        (1, 197, 128, 2),
    ]
    .iter()
    .enumerate()
    {
        check_attention_backward(case, bsz, t, d, heads);
    }
}
