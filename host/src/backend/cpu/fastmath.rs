//! Branch-free f32 `exp` and GELU that the compiler can vectorise, and the slice kernels built
//! on them (bias + GELU, softmax, LayerNorm forward, residual + LayerNorm forward).
//!
//! The step evaluates ~50 M GELUs (erf + exp) and ~15 M softmax exponentials; libm's scalar
//! `erff`/`expf` calls cost more than all the GEMMs of the MLP. These versions are plain
//! arithmetic on `f32` (no calls, no tables, no saturating casts, selects instead of branches),
//! so the loops compile to SIMD. Accuracy (tested against f64 below): `exp` within 2.5e-7
//! relative, `erf` within 1.5e-7 absolute (Abramowitz & Stegun 7.1.26), so GELU and its
//! derivative are within 2e-7 (1 + |x|).
//!
//! Compiled three times (AVX-512, AVX2 + FMA, baseline) and chosen at run time by [`simd_level`]
//! (the environment variable [`SIMD_ENV`] can force a lower one). Sums (the softmax denominator)
//! use eight lanes in a fixed order and FMA contraction is never requested, so every build gives
//! the same bits (tested below); the choice is still made once per process.

const LOG2E: f32 = core::f32::consts::LOG2_E;
// ln 2 split so that n * LN2_HI is exact for |n| < 2^8.
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;
/// Adding and subtracting 1.5 * 2^23 rounds an f32 of magnitude < 2^22 to the nearest integer.
const ROUND_MAGIC: f32 = 12_582_912.0;
/// `2^23 + 127`: adding it to an integer-valued `n` in [-126, 127] leaves `n + 127` in the low
/// mantissa bits, which shifted by 23 are the exponent field of `2^n`.
const EXP_BIAS_MAGIC: f32 = 8_388_735.0;

/// `e^x`, for any finite `x` (clamped to [-87.3, 88.7]: tiny results are ~1e-38, not 0).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.3, 88.7);
    let n = (x * LOG2E + ROUND_MAGIC) - ROUND_MAGIC;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    // Taylor to degree 7 on |r| <= ln2 / 2: truncation below 5e-9 relative.
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // 2^n from the exponent bits; n in [-126, 127] keeps the scale a normal number (x = 88.7
    // gives n = 128: split as 2^127 * 2 so the top of the range does not overflow the field).
    let top = if n > 127.0 { 2.0 } else { 1.0 };
    let n = n.clamp(-126.0, 127.0);
    let scale = f32::from_bits((n + EXP_BIAS_MAGIC).to_bits() << 23);
    p * scale * top
}

const FRAC_1_SQRT_2: f32 = core::f32::consts::FRAC_1_SQRT_2;
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;
// Abramowitz & Stegun 7.1.26.
const AS_P: f32 = 0.327_591_1;
const AS_A: [f32; 5] = [
    0.254_829_6,
    -0.284_496_74,
    1.421_413_8,
    -1.453_152,
    1.061_405_4,
];

/// `(Phi(x), phi(x))`: the standard normal CDF and density, sharing one `exp`.
#[inline(always)]
fn cdf_pdf(x: f32) -> (f32, f32) {
    let z = x.abs() * FRAC_1_SQRT_2;
    let t = 1.0 / (1.0 + AS_P * z);
    let poly = t * (AS_A[0] + t * (AS_A[1] + t * (AS_A[2] + t * (AS_A[3] + t * AS_A[4]))));
    let e = exp(-z * z);
    // erfc(|x| / sqrt 2) = poly e; Phi(x) = 1 - erfc / 2 for x >= 0, erfc / 2 otherwise.
    let half_erfc = 0.5 * poly * e;
    let cdf = if x >= 0.0 { 1.0 - half_erfc } else { half_erfc };
    (cdf, FRAC_1_SQRT_2PI * e)
}

/// `x Phi(x)`.
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    x * cdf_pdf(x).0
}

/// `d gelu / dx = Phi(x) + x phi(x)`.
#[inline(always)]
pub fn gelu_grad(x: f32) -> f32 {
    let (c, p) = cdf_pdf(x);
    c + x * p
}

/// The instruction set the slice kernels below run with, decided once per process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SimdLevel {
    /// The baseline target (SSE2 on x86-64).
    Baseline,
    /// AVX2 + FMA.
    Avx2,
    /// AVX-512 F (16 lanes).
    Avx512,
}

/// The environment variable that caps [`simd_level`]: `baseline`, `avx2` or `avx512` (what the
/// CPU lacks is never used, whatever it says). For testing the lower paths on a CPU that has
/// the higher ones; the GEMM crate makes its own choice from the CPU alone.
pub const SIMD_ENV: &str = "DINOVMF_SIMD";

/// The best level the CPU supports.
pub fn detected_simd_level() -> SimdLevel {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            return SimdLevel::Avx512;
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            return SimdLevel::Avx2;
        }
    }
    SimdLevel::Baseline
}

/// Parses a [`SIMD_ENV`] value.
pub fn parse_simd_level(s: &str) -> Option<SimdLevel> {
    match s.trim().to_ascii_lowercase().as_str() {
        "baseline" | "scalar" | "none" => Some(SimdLevel::Baseline),
        "avx2" => Some(SimdLevel::Avx2),
        "avx512" | "avx-512" => Some(SimdLevel::Avx512),
        _ => None,
    }
}

/// The level the kernels run with: the CPU's, capped by [`SIMD_ENV`] when set (an unknown value
/// is reported once on stderr and ignored). Decided on the first call, then fixed.
pub fn simd_level() -> SimdLevel {
    use std::sync::OnceLock;
    static LEVEL: OnceLock<SimdLevel> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let cpu = detected_simd_level();
        match std::env::var(SIMD_ENV) {
            Ok(v) => match parse_simd_level(&v) {
                Some(cap) => cpu.min(cap),
                None => {
                    eprintln!("warning: {SIMD_ENV}={v:?} is not baseline, avx2 or avx512: ignored");
                    cpu
                }
            },
            Err(_) => cpu,
        }
    })
}

/// Defines `pub fn $name(args)` that runs `$body` compiled for AVX-512, for AVX2 + FMA or for
/// the baseline target, whichever [`simd_level`] says, and `pub fn $name_at(level, args)` that
/// runs it at a given level (capped by what the CPU has; for tests). `$body` does the same
/// arithmetic in the same order on every path (element-wise work, sums in fixed lanes, no FMA
/// contraction), so the paths agree to the bit; the tests below check that on the CPU they run on.
macro_rules! multiversion {
    ($(#[$m:meta])* pub fn $name:ident / $name_at:ident($($a:ident: $t:ty),* $(,)?) $body:block) => {
        multiversion! { $(#[$m])* pub fn $name / $name_at($($a: $t),*) -> () $body }
    };
    ($(#[$m:meta])* pub fn $name:ident / $name_at:ident($($a:ident: $t:ty),* $(,)?) -> $r:ty $body:block) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        pub fn $name($($a: $t),*) -> $r {
            $name_at(simd_level(), $($a),*)
        }

        /// The same kernel at `level` (or the best level below it that the CPU has).
        #[allow(clippy::too_many_arguments)]
        pub fn $name_at(level: SimdLevel, $($a: $t),*) -> $r {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body($($a: $t),*) -> $r $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn avx512($($a: $t),*) -> $r {
                body($($a),*)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn avx2($($a: $t),*) -> $r {
                body($($a),*)
            }
            #[cfg(target_arch = "x86_64")]
            match level.min(detected_simd_level()) {
                // SAFETY: the level never exceeds what the CPU supports.
                SimdLevel::Avx512 => return unsafe { avx512($($a),*) },
                SimdLevel::Avx2 => return unsafe { avx2($($a),*) },
                SimdLevel::Baseline => {}
            }
            let _ = level;
            body($($a),*)
        }
    };
}

pub(crate) use multiversion;

multiversion! {
    /// Rows of `pre[rows, cols]`: `pre += bias`, `act = gelu(pre)`, and `dgelu = gelu'(pre)`
    /// when given (what the backward multiplies by, saving it a second erf).
    pub fn bias_gelu_rows / bias_gelu_rows_at(pre: &mut [f32], act: &mut [f32], dgelu: Option<&mut [f32]>, bias: &[f32]) {
        let cols = bias.len();
        match dgelu {
            Some(dg) => {
                for ((p, a), g) in pre
                    .chunks_exact_mut(cols)
                    .zip(act.chunks_exact_mut(cols))
                    .zip(dg.chunks_exact_mut(cols))
                {
                    for i in 0..cols {
                        let x = p[i] + bias[i];
                        let (c, d) = cdf_pdf(x);
                        p[i] = x;
                        a[i] = x * c;
                        g[i] = c + x * d;
                    }
                }
            }
            None => {
                for (p, a) in pre.chunks_exact_mut(cols).zip(act.chunks_exact_mut(cols)) {
                    for i in 0..cols {
                        let x = p[i] + bias[i];
                        p[i] = x;
                        a[i] = gelu(x);
                    }
                }
            }
        }
    }
}

multiversion! {
    /// Softmax of every row of `s[rows, cols]`, in place (max-shifted; sums in 8 fixed lanes).
    pub fn softmax_rows / softmax_rows_at(s: &mut [f32], cols: usize) {
        for row in s.chunks_exact_mut(cols) {
            let mut mx = [f32::NEG_INFINITY; 8];
            let mut it = row.chunks_exact(8);
            for c in &mut it {
                for j in 0..8 {
                    mx[j] = if c[j] > mx[j] { c[j] } else { mx[j] };
                }
            }
            let mut m = f32::NEG_INFINITY;
            for &x in mx.iter().chain(it.remainder()) {
                m = m.max(x);
            }
            let mut acc = [0.0f32; 8];
            let mut it = row.chunks_exact_mut(8);
            for c in &mut it {
                for j in 0..8 {
                    let e = exp(c[j] - m);
                    c[j] = e;
                    acc[j] += e;
                }
            }
            let mut sum = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
            for x in it.into_remainder() {
                let e = exp(*x - m);
                *x = e;
                sum += e;
            }
            let inv = 1.0 / sum;
            for x in row.iter_mut() {
                *x *= inv;
            }
        }
    }
}

/// Sum of `v` in eight fixed lanes, combined pairwise (the same bits at every SIMD width).
#[inline(always)]
pub(crate) fn lane_sum(v: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0.0f32; 8];
    let mut it = v.chunks_exact(8);
    for c in &mut it {
        for j in 0..8 {
            acc[j] += f(c[j]);
        }
    }
    let mut sum = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for &x in it.remainder() {
        sum += f(x);
    }
    sum
}

multiversion! {
    /// LayerNorm forward of every row of `x[rows, d]` (`d = gamma.len()`): `y = (x - mean) rstd
    /// gamma + beta` with `mean`, `rstd = 1 / sqrt(var + eps)` per row (two-pass variance like
    /// core's reference, whose sequential sums this replaces by [`lane_sum`]'s eight lanes).
    pub fn layernorm_rows / layernorm_rows_at(
        y: &mut [f32],
        mean: &mut [f32],
        rstd: &mut [f32],
        x: &[f32],
        gamma: &[f32],
        beta: &[f32],
        eps: f32,
    ) {
        let d = gamma.len();
        for (((yr, xr), m), r) in y
            .chunks_exact_mut(d)
            .zip(x.chunks_exact(d))
            .zip(mean.iter_mut())
            .zip(rstd.iter_mut())
        {
            (*m, *r) = layernorm_row(yr, xr, gamma, beta, eps);
        }
    }
}

multiversion! {
    /// LayerNorm backward of every row of `[rows, d]` (`d = gamma.len()`), ADDING the input
    /// gradient into `dx` (`dx += LN'(dy)`, the residual stream's gradient) and accumulating
    /// `dgamma += dy xhat`, `dbeta += dy` row after row. The arithmetic of core's
    /// `ops::layernorm_backward`, with its two per-row means in [`lane_sum`]'s eight lanes.
    #[allow(clippy::too_many_arguments)]
    pub fn layernorm_backward_add_rows / layernorm_backward_add_rows_at(
        dx: &mut [f32],
        dgamma: &mut [f32],
        dbeta: &mut [f32],
        dy: &[f32],
        x: &[f32],
        mean: &[f32],
        rstd: &[f32],
        gamma: &[f32],
    ) {
        let d = gamma.len();
        let (dgamma, dbeta) = (&mut dgamma[..d], &mut dbeta[..d]);
        let inv_d = 1.0 / d as f32;
        for ((((dxr, dyr), xr), &m), &s) in dx
            .chunks_exact_mut(d)
            .zip(dy.chunks_exact(d))
            .zip(x.chunks_exact(d))
            .zip(mean)
            .zip(rstd)
        {
            let mut acc_g = [0.0f32; 8];
            let mut acc_gx = [0.0f32; 8];
            let (cy, cx, cg) = (dyr.chunks_exact(8), xr.chunks_exact(8), gamma.chunks_exact(8));
            let (ry, rx, rg) = (cy.remainder(), cx.remainder(), cg.remainder());
            for ((y, x), g) in cy.zip(cx).zip(cg) {
                for j in 0..8 {
                    let xh = (x[j] - m) * s;
                    let gy = y[j] * g[j];
                    acc_g[j] += gy;
                    acc_gx[j] += gy * xh;
                }
            }
            let lanes = |a: [f32; 8]| ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
            let (mut sum_g, mut sum_gx) = (lanes(acc_g), lanes(acc_gx));
            for ((&y, &x), &g) in ry.iter().zip(rx).zip(rg) {
                let xh = (x - m) * s;
                sum_g += y * g;
                sum_gx += y * g * xh;
            }
            let (mean_g, mean_gx) = (sum_g * inv_d, sum_gx * inv_d);
            let (dxr, dyr, xr) = (&mut dxr[..d], &dyr[..d], &xr[..d]);
            for i in 0..d {
                let xh = (xr[i] - m) * s;
                dgamma[i] += dyr[i] * xh;
                dbeta[i] += dyr[i];
                dxr[i] += s * (dyr[i] * gamma[i] - mean_g - xh * mean_gx);
            }
        }
    }
}

/// One row of [`layernorm_rows`]: `y = (x - mean) rstd gamma + beta`; returns `(mean, rstd)`.
/// The one place the LayerNorm row arithmetic is written, so that the fused
/// [`residual_layernorm_rows`] gives the same bits as the separate passes.
#[inline(always)]
fn layernorm_row(y: &mut [f32], x: &[f32], gamma: &[f32], beta: &[f32], eps: f32) -> (f32, f32) {
    let d = gamma.len();
    // Every slice cut to `d` up front, so the loop below has no bounds checks left.
    let (y, x, beta) = (&mut y[..d], &x[..d], &beta[..d]);
    let inv_d = 1.0 / d as f32;
    let mu = lane_sum(x, |v| v) * inv_d;
    let var = lane_sum(x, |v| (v - mu) * (v - mu)) * inv_d;
    let s = 1.0 / (var + eps).sqrt();
    for i in 0..d {
        y[i] = (x[i] - mu) * s * gamma[i] + beta[i];
    }
    (mu, s)
}

multiversion! {
    /// A residual step and the LayerNorm that reads its result, in one pass over each row of
    /// `[rows, d]` (`d = gamma.len()`): `out = x + scale (branch + bias)` (the residual stream
    /// after a branch, its drop-path factor and its output bias), then `y`, `mean`, `rstd` the
    /// LayerNorm of `out` exactly as [`layernorm_rows`] computes them. Each row of `out` is
    /// still in cache when its statistics read it; the bits equal those of the residual pass
    /// followed by [`layernorm_rows`] (same operations in the same order, no FMA contraction).
    #[allow(clippy::too_many_arguments)]
    pub fn residual_layernorm_rows / residual_layernorm_rows_at(
        out: &mut [f32],
        y: &mut [f32],
        mean: &mut [f32],
        rstd: &mut [f32],
        x: &[f32],
        branch: &[f32],
        bias: &[f32],
        scale: f32,
        gamma: &[f32],
        beta: &[f32],
        eps: f32,
    ) {
        let d = gamma.len();
        let bias = &bias[..d];
        for (((((or, yr), xr), br), m), r) in out
            .chunks_exact_mut(d)
            .zip(y.chunks_exact_mut(d))
            .zip(x.chunks_exact(d))
            .zip(branch.chunks_exact(d))
            .zip(mean.iter_mut())
            .zip(rstd.iter_mut())
        {
            for (((o, &x), &b), &bb) in or.iter_mut().zip(xr).zip(br).zip(bias) {
                *o = x + scale * (b + bb);
            }
            (*m, *r) = layernorm_row(yr, or, gamma, beta, eps);
        }
    }
}

/// In-place softmax of one row.
#[inline]
pub fn softmax_in_place(row: &mut [f32]) {
    let n = row.len();
    softmax_rows(row, n);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `scripts/check-no-avx512.sh` runs these tests on emulated CPUs and names, in
    /// `DINOVMF_EXPECT_SIMD` (and `DINOVMF_EXPECT_BF16`: amx, avx512bf16 or emulated), what the
    /// run-time dispatch must pick there, so a detection that fell through to the wrong path
    /// fails instead of passing on whichever path it took. Unset: checks nothing beyond
    /// consistency.
    #[test]
    fn dispatch_picks_the_level_the_cpu_has() {
        let level = simd_level();
        assert!(level <= detected_simd_level());
        let bf16 = super::super::gemm_bf16::bf16_kernel();
        if level < SimdLevel::Avx512 {
            assert_eq!(bf16, super::super::gemm_bf16::Bf16Kernel::Emulated);
        }
        if let Ok(want) = std::env::var("DINOVMF_EXPECT_SIMD") {
            let want =
                parse_simd_level(&want).expect("DINOVMF_EXPECT_SIMD: baseline, avx2 or avx512");
            assert_eq!(detected_simd_level(), want, "detected SIMD level");
            assert_eq!(level, want, "SIMD level in use");
        }
        if let Ok(want) = std::env::var("DINOVMF_EXPECT_BF16") {
            let got = format!("{bf16:?}").to_ascii_lowercase();
            assert_eq!(got, want.to_ascii_lowercase(), "bf16 kernel");
        }
    }

    #[test]
    fn exp_within_2p5e7_rel_of_f64() {
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            assert!(
                ((got - want) / want).abs() < 2.5e-7,
                "exp({x}) = {got} vs {want}"
            );
            x += 0.0137;
        }
        assert!(exp(-1000.0) < 1e-37);
        assert!((exp(88.7) as f64 / (88.7f32 as f64).exp() - 1.0).abs() < 1e-6);
    }

    /// f64 erf: Maclaurin series for |x| <= 4 (largest term ~1e7, so ~1e-9 absolute), the
    /// asymptotic erfc series beyond (erfc(4) ~ 1.5e-8, so its truncation is far below 1e-12).
    fn erf64(x: f64) -> f64 {
        let sqrt_pi = core::f64::consts::PI.sqrt();
        if x.abs() > 4.0 {
            let z2 = x * x;
            let tail = (-z2).exp() / (x.abs() * sqrt_pi)
                * (1.0 - 1.0 / (2.0 * z2) + 3.0 / (4.0 * z2 * z2));
            return x.signum() * (1.0 - tail);
        }
        let mut sum = 0.0;
        let mut term = x;
        let mut n = 0.0;
        loop {
            let add = term / (2.0 * n + 1.0);
            sum += add;
            if add.abs() < 1e-18 {
                break;
            }
            n += 1.0;
            term *= -x * x / n;
        }
        sum * 2.0 / sqrt_pi
    }

    #[test]
    fn gelu_and_grad_within_2e7_abs_of_f64() {
        let mut x = -9.0f32;
        while x < 9.0 {
            let xd = x as f64;
            let cdf = 0.5 * (1.0 + erf64(xd / 2f64.sqrt()));
            let pdf = (-0.5 * xd * xd).exp() / (2.0 * core::f64::consts::PI).sqrt();
            let g = xd * cdf;
            let dg = cdf + xd * pdf;
            let tol = 2e-7 * (1.0 + xd.abs());
            assert!((gelu(x) as f64 - g).abs() < tol, "gelu({x})");
            assert!((gelu_grad(x) as f64 - dg).abs() < tol, "gelu'({x})");
            x += 0.00731;
        }
        // the slice kernels (whichever build runs) agree with the scalar functions
        let xs: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 0.017).collect();
        let bias: Vec<f32> = (0..10).map(|i| i as f32 * 0.01).collect();
        let mut pre = xs.clone();
        let mut act = vec![0.0; 1000];
        let mut dg = vec![0.0; 1000];
        bias_gelu_rows(&mut pre, &mut act, Some(&mut dg), &bias);
        for i in 0..1000 {
            let x = xs[i] + bias[i % 10];
            assert_eq!(pre[i], x);
            assert!((act[i] - gelu(x)).abs() <= 1e-6 * (1.0 + x.abs()));
            assert!((dg[i] - gelu_grad(x)).abs() <= 1e-6 * (1.0 + x.abs()));
        }
    }

    #[test]
    fn every_simd_level_gives_the_same_bits() {
        // What a CPU without AVX-512 (or without AVX2) runs must equal what this one runs by
        // default; a level the CPU lacks falls back to the best below it.
        let n = 37 * 19;
        let x: Vec<f32> = (0..n)
            .map(|i| ((i * 7919 % 1013) as f32 - 506.0) * 0.011)
            .collect();
        let bias: Vec<f32> = (0..19).map(|i| (i as f32 - 9.0) * 0.03).collect();
        let gamma: Vec<f32> = (0..19).map(|i| 1.0 + i as f32 * 0.02).collect();
        let run = |level: SimdLevel| {
            let (mut pre, mut act, mut dg) = (x.clone(), vec![f32::NAN; n], vec![f32::NAN; n]);
            bias_gelu_rows_at(level, &mut pre, &mut act, Some(&mut dg), &bias);
            let mut sm = x.clone();
            softmax_rows_at(level, &mut sm, 19);
            let (mut y, mut m, mut r) = (vec![f32::NAN; n], vec![f32::NAN; 37], vec![f32::NAN; 37]);
            layernorm_rows_at(level, &mut y, &mut m, &mut r, &x, &gamma, &bias, 1e-6);
            let (mut o2, mut y2) = (vec![f32::NAN; n], vec![f32::NAN; n]);
            let (mut m2, mut r2) = (vec![f32::NAN; 37], vec![f32::NAN; 37]);
            residual_layernorm_rows_at(
                level, &mut o2, &mut y2, &mut m2, &mut r2, &x, &sm, &bias, 1.25, &gamma, &bias,
                1e-6,
            );
            let (mut dx, mut dgam, mut dbet) = (sm.clone(), vec![0.5f32; 19], vec![-0.5f32; 19]);
            layernorm_backward_add_rows_at(
                level, &mut dx, &mut dgam, &mut dbet, &act, &x, &m, &r, &gamma,
            );
            [pre, act, dg, sm, y, m, r, o2, y2, m2, r2, dx, dgam, dbet]
                .map(|v| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>())
        };
        let best = run(detected_simd_level());
        assert!(best
            .iter()
            .all(|v| v.iter().all(|&b| !f32::from_bits(b).is_nan())));
        for level in [SimdLevel::Baseline, SimdLevel::Avx2, SimdLevel::Avx512] {
            assert!(
                run(level) == best,
                "{level:?} differs from {:?}",
                detected_simd_level()
            );
        }
        assert_eq!(parse_simd_level(" AVX2 "), Some(SimdLevel::Avx2));
        assert_eq!(parse_simd_level("avx512"), Some(SimdLevel::Avx512));
        assert_eq!(parse_simd_level("baseline"), Some(SimdLevel::Baseline));
        assert_eq!(parse_simd_level("sse9"), None);
        assert!(simd_level() <= detected_simd_level());
    }

    #[test]
    fn softmax_rows_within_1e6_of_f64() {
        for cols in [1usize, 7, 8, 17, 65] {
            let x: Vec<f32> = (0..3 * cols)
                .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.7)
                .collect();
            let mut s = x.clone();
            softmax_rows(&mut s, cols);
            for (r, xr) in s.chunks(cols).zip(x.chunks(cols)) {
                let m = xr.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
                let z: f64 = xr.iter().map(|&v| (v as f64 - m).exp()).sum();
                for (&a, &v) in r.iter().zip(xr) {
                    let want = (v as f64 - m).exp() / z;
                    assert!(
                        (a as f64 - want).abs() <= 1e-6 * want.max(1e-30) + 1e-12,
                        "{a} vs {want}"
                    );
                }
            }
        }
    }
}
