//! The loss's per-row kernels on the CPU: one teacher row's targets (and its entropy), one
//! student row's cross-entropy against its targets (and `dL/dl`). They are core's
//! `centering::teacher_targets_row` and `loss::xent_row_forward_backward_inplace` (the plain
//! references, which the tests below hold them to at 2e-6 of an f64 evaluation) made for rows
//! of thousands of prototypes, the step's ~4 M exponentials:
//!
//! - exponentials are [`fastmath::exp`] and every sum runs in eight fixed lanes, compiled for
//!   AVX-512 / AVX2 + FMA / baseline and chosen at run time like the other row kernels, with
//!   the same bits at every level (tested);
//! - the center's per-prototype shift (`c / tau_t`, or `ln c` for probability centering) comes
//!   precomputed once per step ([`teacher_shifts`], through core's `teacher_shift`) instead of
//!   twice per row and prototype;
//! - the target's entropy is `ln Z - sum_k p_k (x_k - c_k - m)` (no logarithm per entry), for
//!   `p = exp(x - c - m) / Z`.
//!
//! iBOT's patch loss (`mim.rs`) and the [CLS] loss (`loss.rs`) both use them.
use dinovmf_core::centering::{teacher_shift, Centering};

use super::fastmath::{detected_simd_level, exp, multiversion, simd_level, SimdLevel};

/// `shift[k] = teacher_shift(center[k])`: what the teacher's logits lose before the softmax
/// (`c / tau_t` for logit centering, `ln max(c, floor)` for probability centering, 0 for
/// Sinkhorn-Knopp).
pub fn teacher_shifts(shift: &mut [f32], center: &[f32], tau_t: f32, centering: Centering) {
    let inv_tau = 1.0 / tau_t;
    for (s, &c) in shift.iter_mut().zip(center) {
        *s = teacher_shift(c, inv_tau, centering);
    }
}

/// The eight lanes of a sum, combined pairwise (the order of `fastmath`'s lane sums).
#[inline(always)]
fn combine(a: [f32; 8]) -> f32 {
    ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]))
}

/// `max_i f(a_i, b_i)` (exact in any order).
#[inline(always)]
fn max2(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut mx = [f32::NEG_INFINITY; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for j in 0..8 {
            let v = f(x[j], y[j]);
            mx[j] = if v > mx[j] { v } else { mx[j] };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for v in mx
        .into_iter()
        .chain(ra.iter().zip(rb).map(|(&x, &y)| f(x, y)))
    {
        m = if v > m { v } else { m };
    }
    m
}

/// `sum_i f(a_i, b_i)` in eight fixed lanes.
#[inline(always)]
fn sum2(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for j in 0..8 {
            acc[j] += f(x[j], y[j]);
        }
    }
    let mut s = combine(acc);
    for (&x, &y) in ra.iter().zip(rb) {
        s += f(x, y);
    }
    s
}

/// `out_i = f(a_i, b_i)`, returning `sum_i out_i` in eight fixed lanes.
#[inline(always)]
fn map2_sum(out: &mut [f32], a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    let n = out.len().min(a.len()).min(b.len());
    let (out, a, b) = (&mut out[..n], &a[..n], &b[..n]);
    let mut acc = [0.0f32; 8];
    let mut co = out.chunks_exact_mut(8);
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for ((o, x), y) in (&mut co).zip(ca).zip(cb) {
        for j in 0..8 {
            let v = f(x[j], y[j]);
            o[j] = v;
            acc[j] += v;
        }
    }
    let mut s = combine(acc);
    for ((o, &x), &y) in co.into_remainder().iter_mut().zip(ra).zip(rb) {
        let v = f(x, y);
        *o = v;
        s += v;
    }
    s
}

multiversion! {
    /// One teacher row, as core's `teacher_targets_row`: writes the target `pt = softmax(l -
    /// shift)` (`shift` from [`teacher_shifts`]) and adds `w *` the row's centering statistic
    /// into `stat` (`tau_t l` for logit centering, `softmax(l)` for probability centering and
    /// for Sinkhorn-Knopp, where `shift` is 0 and the balancing is the batch's). Returns the
    /// target's entropy (nats).
    pub fn teacher_row / teacher_row_at(
        pt: &mut [f32],
        stat: &mut [f32],
        l: &[f32],
        shift: &[f32],
        tau_t: f32,
        centering: Centering,
        w: f32,
    ) -> f32 {
        let k = l.len();
        let (pt, stat, shift) = (&mut pt[..k], &mut stat[..k], &shift[..k]);
        match centering {
            Centering::Logit => {
                for (s, &x) in stat.iter_mut().zip(l) {
                    *s += w * (tau_t * x);
                }
            }
            Centering::Probability | Centering::Sinkhorn { .. } => {
                let m = max2(l, l, |x, _| x);
                let z = map2_sum(pt, l, l, |x, _| exp(x - m));
                let inv = w / z;
                for (s, &e) in stat.iter_mut().zip(pt.iter()) {
                    *s += e * inv;
                }
            }
        }
        let m = max2(l, shift, |x, c| x - c);
        let z = map2_sum(pt, l, shift, |x, c| exp(x - c - m));
        let inv = 1.0 / z;
        for o in pt.iter_mut() {
            *o *= inv;
        }
        // sum_k p_k ln p_k = sum_k p_k (x_k - c_k - m) - ln Z, with the x_k - c_k - m the
        // exponents above (recomputed: the same bits).
        let mut acc = [0.0f32; 8];
        let mut px = 0.0f32;
        {
            let (cp, cl, cs) = (pt.chunks_exact(8), l.chunks_exact(8), shift.chunks_exact(8));
            let (rp, rl, rs) = (cp.remainder(), cl.remainder(), cs.remainder());
            for ((p, x), c) in cp.zip(cl).zip(cs) {
                for j in 0..8 {
                    acc[j] += p[j] * (x[j] - c[j] - m);
                }
            }
            for ((&p, &x), &c) in rp.iter().zip(rl).zip(rs) {
                px += p * (x - c - m);
            }
        }
        z.ln() - (combine(acc) + px)
    }
}

multiversion! {
    /// One student row against the sum of its targets, in place, as core's
    /// `xent_row_forward_backward_inplace`: `l` holds the logits on entry and `dL/dl =
    /// (n_targets softmax(l) - target_sum) grad_scale` on exit. Returns `sum_k t_k (lse - l_k)`
    /// (unscaled).
    pub fn xent_row / xent_row_at(
        l: &mut [f32],
        target_sum: &[f32],
        n_targets: f32,
        grad_scale: f32,
    ) -> f32 {
        let k = l.len();
        let t = &target_sum[..k];
        let m = max2(l, l, |x, _| x);
        let lse = m + sum2(l, l, |x, _| exp(x - m)).ln();
        let mut acc = [0.0f32; 8];
        let mut rest = 0.0f32;
        let mut cl = l.chunks_exact_mut(8);
        let ct = t.chunks_exact(8);
        let rt = ct.remainder();
        for (x, t) in (&mut cl).zip(ct) {
            for j in 0..8 {
                let nls = lse - x[j];
                acc[j] += t[j] * nls;
                x[j] = (n_targets * exp(-nls) - t[j]) * grad_scale;
            }
        }
        for (x, &t) in cl.into_remainder().iter_mut().zip(rt) {
            let nls = lse - *x;
            rest += t * nls;
            *x = (n_targets * exp(-nls) - t) * grad_scale;
        }
        combine(acc) + rest
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dinovmf_core::centering::teacher_targets_row;
    use dinovmf_core::collapse::entropy;
    use dinovmf_core::loss::xent_row_forward_backward_inplace;
    use rand::{Rng, SeedableRng};

    const LEVELS: [SimdLevel; 3] = [SimdLevel::Baseline, SimdLevel::Avx2, SimdLevel::Avx512];
    const CENTERINGS: [Centering; 3] = [
        Centering::Logit,
        Centering::Probability,
        Centering::Sinkhorn { iters: 3 },
    ];

    /// Logits of a sharp teacher (a few large values over a spread) and a center with some
    /// entries under the floor, at row lengths around the eight lanes.
    fn case(k: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let l: Vec<f32> = (0..k)
            .map(|i| rng.gen_range(-20.0f32..20.0) + if i % 97 == 3 { 30.0 } else { 0.0 })
            .collect();
        let c: Vec<f32> = (0..k)
            .map(|i| {
                if i % 13 == 0 {
                    1e-12
                } else {
                    rng.gen_range(0.0f32..2.0) / k as f32
                }
            })
            .collect();
        (l, c)
    }

    fn max_rel(a: &[f32], b: &[f64]) -> f64 {
        let scale = b.iter().fold(0.0f64, |m, &x| m.max(x.abs())).max(1e-30);
        a.iter()
            .zip(b)
            .fold(0.0f64, |m, (&x, &y)| m.max((x as f64 - y).abs() / scale))
    }

    #[test]
    fn teacher_row_within_2e6_of_core_in_f64_at_every_centering() {
        for k in [1, 7, 8, 9, 63, 1000, 4096] {
            for centering in CENTERINGS {
                let (l, c) = case(k, k as u64);
                let tau = 0.04f32;
                let w = 0.25f32;
                let mut shift = vec![f32::NAN; k];
                teacher_shifts(&mut shift, &c, tau, centering);
                let mut pt = vec![f32::NAN; k];
                let mut stat = vec![0.5f32; k];
                let h = teacher_row(&mut pt, &mut stat, &l, &shift, tau, centering, w);

                let l64: Vec<f64> = l.iter().map(|&x| x as f64).collect();
                let c64: Vec<f64> = c.iter().map(|&x| x as f64).collect();
                let mut pt64 = vec![0.0f64; k];
                let mut stat64 = vec![0.5f64; k];
                teacher_targets_row(
                    &mut pt64,
                    &mut stat64,
                    &l64,
                    &c64,
                    tau as f64,
                    centering,
                    w as f64,
                );
                let h64 = entropy(&pt64);
                let what = format!("k={k} {centering:?}");
                assert!(max_rel(&pt, &pt64) < 2e-6, "{what}: targets");
                assert!(max_rel(&stat, &stat64) < 2e-6, "{what}: statistic");
                assert!(
                    (h as f64 - h64).abs() < 2e-6 * (1.0 + h64.abs()),
                    "{what}: entropy {h} against {h64}"
                );
            }
        }
    }

    #[test]
    fn xent_row_within_2e6_of_core_in_f64() {
        for k in [1, 7, 8, 9, 63, 1000, 4096] {
            let (l, c) = case(k, 100 + k as u64);
            // Two targets per row (sum 2), as the multi-crop loss gives a local crop.
            let z: f32 = c.iter().sum();
            let t: Vec<f32> = c.iter().map(|&x| 2.0 * x / z).collect();
            let mut dl = l.clone();
            let loss = xent_row(&mut dl, &t, 2.0, 0.125);

            let mut dl64: Vec<f64> = l.iter().map(|&x| x as f64).collect();
            let t64: Vec<f64> = t.iter().map(|&x| x as f64).collect();
            let loss64 = xent_row_forward_backward_inplace(&mut dl64, &t64, 2.0, 0.125);
            assert!(
                (loss as f64 - loss64).abs() < 2e-6 * loss64.abs().max(1.0),
                "k={k}: loss {loss} against {loss64}"
            );
            assert!(max_rel(&dl, &dl64) < 2e-6, "k={k}: dL/dl");
        }
    }

    #[test]
    fn every_simd_level_gives_the_same_bits() {
        let k = 1003;
        let (l, c) = case(k, 7);
        for centering in CENTERINGS {
            let mut shift = vec![0.0f32; k];
            teacher_shifts(&mut shift, &c, 0.04, centering);
            let run = |level| {
                let (mut pt, mut stat) = (vec![f32::NAN; k], vec![0.0f32; k]);
                let h = teacher_row_at(level, &mut pt, &mut stat, &l, &shift, 0.04, centering, 0.5);
                let mut dl = l.clone();
                let loss = xent_row_at(level, &mut dl, &pt, 1.0, 0.5);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                (
                    h.to_bits(),
                    loss.to_bits(),
                    bits(&pt),
                    bits(&stat),
                    bits(&dl),
                )
            };
            let base = run(SimdLevel::Baseline);
            for level in LEVELS {
                if level <= detected_simd_level() {
                    assert!(run(level) == base, "{level:?} {centering:?}");
                }
            }
        }
    }
}
