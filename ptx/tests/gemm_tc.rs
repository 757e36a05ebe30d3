//! The tensor-core GEMM (`gemm_tc_{nn,nt,tn}_bf16`) on the simulator against dinovmf-core's
//! GEMMs (`linear_forward` / `linear_backward`) in f64, at sizes that are not multiples of the
//! 64 x 64 x 32 tile (and odd leading dimensions, which take the element-wise staging path
//! instead of `cp.async`), outputs NaN-poisoned.
//!
//! Tolerances: against f64 on the same bf16 inputs only the f32 accumulation differs
//! (`|err| <= 1e-5 + 1e-5 |want|`); against f64 on the f32 inputs before rounding to bf16, each
//! product carries at most two bf16 roundings (2^-8 relative), so `|err| <= 2^-8 sum |a b| +
//! 1e-5` (the stated bf16 tolerance).
mod common;
use common::*;
use dinovmf_core::ops;
use dinovmf_ptx::elem::Bf16;
use dinovmf_ptx::kernels::gemm::GemmShape;
use dinovmf_ptx::kernels::gemm_tc::gemm_tc;
use dinovmf_ptx::manifest;
use dinovmf_ptx::sim::{self, SimOptions};

fn bf16s(x: &[f32]) -> Vec<Bf16> {
    x.iter().map(|&v| Bf16::from_f32(v)).collect()
}

fn f64s_of(x: &[Bf16]) -> Vec<f64> {
    x.iter().map(|v| v.to_f32() as f64).collect()
}

fn run<const TA: bool, const TB: bool>(
    c: &mut [f32],
    a: &[Bf16],
    b: &[Bf16],
    bias: Option<&[f32]>,
    s: &GemmShape,
    batches: usize,
    opts: &SimOptions,
) {
    let name = match (TA, TB) {
        (false, false) => "gemm_tc_nn_bf16",
        (false, true) => "gemm_tc_nt_bf16",
        _ => "gemm_tc_tn_bf16",
    };
    let k = manifest::kernel(name).unwrap();
    sim::launch_with(
        s.grid(batches),
        k.block,
        k.smem_bytes() as usize / 4,
        opts,
        |blk| gemm_tc::<_, f32, TA, TB>(blk, c, a, b, bias, s),
    );
}

/// `|got - want| <= 2^-8 mag + 1e-5` per element (`mag = sum |a b|` from the f32 inputs).
fn assert_bf16_close(what: &str, got: &[f32], want: &[f64], mag: &[f64]) {
    for (i, ((&g, &w), &m)) in got.iter().zip(want).zip(mag).enumerate() {
        let tol = m / 256.0 + 1e-5;
        assert!(
            (g as f64 - w).abs() <= tol,
            "{what}: element {i}: got {g}, want {w} (tolerance {tol:e})"
        );
    }
}

const SIZES: [(usize, usize, usize); 6] = [
    (1, 1, 1),
    (5, 7, 9),
    (70, 130, 48),
    (65, 64, 33),
    (64, 128, 64),
    (130, 70, 100),
];

#[test]
fn tc_linear_forward_nt_matches_core_f64() {
    let mut r = rng(41);
    for (i, &(n, d_out, d_in)) in SIZES.iter().enumerate() {
        let x = rand_vec(&mut r, n * d_in, -1.0, 1.0);
        let w = rand_vec(&mut r, d_out * d_in, -1.0, 1.0);
        let bias = rand_vec(&mut r, d_out, -1.0, 1.0);
        let (xb, wb) = (bf16s(&x), bf16s(&w));
        let mut y = poison(n * d_out);
        let s = GemmShape::plain(n, d_out, d_in, false, true);
        let opts = if i % 2 == 0 {
            SimOptions::exhaustive()
        } else {
            SimOptions::shuffled(i as u64)
        };
        run::<false, true>(&mut y, &xb, &wb, Some(&bias), &s, 1, &opts);
        let b64 = to_f64(&bias);
        let mut want = vec![0f64; n * d_out];
        ops::linear_forward(
            &mut want,
            &f64s_of(&xb),
            &f64s_of(&wb),
            Some(&b64),
            n,
            d_in,
            d_out,
        );
        assert_close("tc nt vs f64 of bf16 inputs", &y, &want, 1e-5, 1e-5);
        // Against the unrounded inputs, within the bf16 tolerance.
        let mut want32 = vec![0f64; n * d_out];
        ops::linear_forward(
            &mut want32,
            &to_f64(&x),
            &to_f64(&w),
            Some(&b64),
            n,
            d_in,
            d_out,
        );
        let xa: Vec<f64> = x.iter().map(|v| v.abs() as f64).collect();
        let wa: Vec<f64> = w.iter().map(|v| v.abs() as f64).collect();
        let mut mag = vec![0f64; n * d_out];
        ops::linear_forward(&mut mag, &xa, &wa, None, n, d_in, d_out);
        assert_bf16_close("tc nt vs f64 of f32 inputs", &y, &want32, &mag);
    }
}

#[test]
fn tc_linear_backward_nn_tn_match_core_f64() {
    let mut r = rng(42);
    for &(n, d_out, d_in) in &SIZES {
        let x = bf16s(&rand_vec(&mut r, n * d_in, -1.0, 1.0));
        let w = bf16s(&rand_vec(&mut r, d_out * d_in, -1.0, 1.0));
        let dy = bf16s(&rand_vec(&mut r, n * d_out, -1.0, 1.0));
        // dx = dy w: "nn".
        let mut dx = poison(n * d_in);
        let s = GemmShape::plain(n, d_in, d_out, false, false);
        run::<false, false>(&mut dx, &dy, &w, None, &s, 1, &SimOptions::exhaustive());
        // dw = 0.5 dy^T x + 1 dw: "tn" with alpha and beta.
        let dw0 = rand_vec(&mut r, d_out * d_in, -1.0, 1.0);
        let mut dw = dw0.clone();
        let mut s = GemmShape::plain(d_out, d_in, n, true, false);
        s.beta = 1.0;
        s.alpha = 0.5;
        run::<true, false>(&mut dw, &dy, &x, None, &s, 1, &SimOptions::exhaustive());

        let (x64, w64, dy64) = (f64s_of(&x), f64s_of(&w), f64s_of(&dy));
        let mut wdx = vec![0f64; n * d_in];
        let mut wdw = vec![0f64; d_out * d_in];
        ops::linear_backward(
            Some(&mut wdx),
            &mut wdw,
            None,
            &dy64,
            &x64,
            &w64,
            n,
            d_in,
            d_out,
        );
        assert_close("tc nn (dx) vs f64", &dx, &wdx, 1e-5, 1e-5);
        let want: Vec<f64> = wdw
            .iter()
            .zip(&dw0)
            .map(|(&g, &d)| 0.5 * g + d as f64)
            .collect();
        assert_close(
            "tc tn (dw, alpha 0.5, beta 1) vs f64",
            &dw,
            &want,
            1e-5,
            1e-5,
        );
    }
}

/// Attention-shaped batches through the entry point (`launch_entry`, the manifest's parameter
/// words): `S[b, h] = Q K^T` for `B = 2`, `H = 3` heads of `T = 37` tokens and head size 16,
/// reading Q and K from one packed `[B, T, 3 D]` qkv buffer (`ld = 3 D`, odd offsets).
#[test]
fn tc_batched_entry_point_matches_core_f64() {
    let (bsz, h, t, hd) = (2usize, 3usize, 37usize, 16usize);
    let d = h * hd;
    let mut r = rng(43);
    let qkv = bf16s(&rand_vec(&mut r, bsz * t * 3 * d, -1.0, 1.0));
    let mut att = poison(bsz * h * t * t);
    let args: Vec<u64> = vec![
        att.as_mut_ptr() as u64,
        qkv.as_ptr() as u64,
        qkv[d..].as_ptr() as u64,
        0,
        qkv.len() as u64,
        (qkv.len() - d) as u64,
        att.len() as u64,
        t as u64,
        t as u64,
        hd as u64,
        (3 * d) as u64,
        (3 * d) as u64,
        t as u64,
        h as u64,
        (t * 3 * d) as u64,
        hd as u64,
        (t * 3 * d) as u64,
        hd as u64,
        (h * t * t) as u64,
        (t * t) as u64,
        0.25f32.to_bits() as u64,
        0,
    ];
    let grid = [
        t.div_ceil(64) as u32,
        t.div_ceil(64) as u32,
        (bsz * h) as u32,
    ];
    // SAFETY: every buffer is as long as its length argument says and only `att` is written.
    assert!(unsafe { sim::launch_entry("gemm_tc_nt_bf16", grid, &args) });
    let q = f64s_of(&qkv);
    let mut want = vec![0f64; att.len()];
    for b in 0..bsz {
        for hh in 0..h {
            for i in 0..t {
                for j in 0..t {
                    let mut acc = 0.0;
                    for e in 0..hd {
                        acc += q[(b * t + i) * 3 * d + hh * hd + e]
                            * q[(b * t + j) * 3 * d + d + hh * hd + e];
                    }
                    want[((b * h + hh) * t + i) * t + j] = 0.25 * acc;
                }
            }
        }
    }
    assert_close("tc batched Q K^T vs f64", &att, &want, 1e-5, 1e-5);
}
