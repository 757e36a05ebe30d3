//! Linear probe on frozen features, solved in closed form: ridge regression of one-hot targets
//! on standardised features (bias through the centering), `W = (X^T X + lambda I)^-1 X^T Y` by
//! Cholesky in f64. The ridge lambda is chosen on a held-out fifth of the training split (best
//! top-1), then the probe is refitted on the whole training split and scored on the test split.
//! The validation fifth is drawn by hashing the row index, not every fifth row: datasets stored
//! class by class in a cycle (the built-in one) would otherwise put whole classes in it.
//! Concatenated LayerNorm outputs are exactly collinear (each block's row is an affine image of
//! a zero-mean vector), so the smallest lambdas can leave the f32 Gram matrix indefinite: those
//! are skipped.
//!
//! Regression onto one-hot targets is the least-squares classifier: on linearly separable,
//! well-conditioned features it separates the classes exactly, and it needs no learning rate,
//! epochs or schedule, so the number depends on the features only.
use anyhow::{bail, ensure, Context, Result};
use nalgebra::{DMatrix, DVector};
use serde::Serialize;

use crate::backend::cpu::gemm::{matmul, Op};

/// The lambdas tried, as multiples of the mean diagonal of `X^T X` (that is, of `n` for
/// standardised features).
pub const RIDGE_GRID: [f64; 9] = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0];

/// What the probe reports (accuracies in [0, 1]).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ProbeScore {
    pub top1: f64,
    pub top5: f64,
    /// The chosen lambda (relative to n) and its top-1 on the validation fifth.
    pub lambda: f64,
    pub val_top1: f64,
    pub features: usize,
}

/// A fitted probe: standardisation, weights `[f, c]` and bias `[c]`.
pub struct Probe {
    mean: Vec<f64>,
    inv_std: Vec<f64>,
    w: DMatrix<f64>,
    b: DVector<f64>,
}

fn standardise_stats(x: &[f32], n: usize, f: usize) -> (Vec<f64>, Vec<f64>) {
    let mut mean = vec![0.0f64; f];
    for r in x.chunks_exact(f).take(n) {
        for (m, &v) in mean.iter_mut().zip(r) {
            *m += v as f64;
        }
    }
    mean.iter_mut().for_each(|m| *m /= n as f64);
    let mut var = vec![0.0f64; f];
    for r in x.chunks_exact(f).take(n) {
        for ((s, &v), m) in var.iter_mut().zip(r).zip(&mean) {
            let d = v as f64 - m;
            *s += d * d;
        }
    }
    // Constant features get unit scale (they standardise to 0 and the ridge ignores them).
    let inv_std = var
        .iter()
        .map(|&s| {
            let sd = (s / n as f64).sqrt();
            if sd > 1e-12 {
                1.0 / sd
            } else {
                1.0
            }
        })
        .collect();
    (mean, inv_std)
}

fn standardised(x: &[f32], n: usize, f: usize, mean: &[f64], inv_std: &[f64]) -> Vec<f32> {
    let mut out = vec![0.0f32; n * f];
    for (o, r) in out.chunks_exact_mut(f).zip(x.chunks_exact(f)) {
        for q in 0..f {
            o[q] = ((r[q] as f64 - mean[q]) * inv_std[q]) as f32;
        }
    }
    out
}

/// Sufficient statistics of a training set: `X^T X` and `X^T Y` (standardised X, centred
/// one-hot Y), the class means of Y.
struct Normal {
    xtx: DMatrix<f64>,
    xty: DMatrix<f64>,
    ymean: DVector<f64>,
}

fn normal_equations(xs: &[f32], labels: &[u32], n: usize, f: usize, c: usize) -> Normal {
    let mut g = vec![0.0f32; f * f];
    matmul(f, f, n, xs, Op::T, xs, Op::N, &mut g, false);
    let xtx = DMatrix::from_row_slice(f, f, &g.iter().map(|&v| v as f64).collect::<Vec<_>>());
    let mut ymean = DVector::zeros(c);
    for &l in labels {
        ymean[l as usize] += 1.0 / n as f64;
    }
    // X is centred, so X^T (Y - 1 ymean^T) = X^T Y: sum the rows of each class.
    let mut xty = DMatrix::zeros(f, c);
    for (r, &l) in xs.chunks_exact(f).zip(labels) {
        for q in 0..f {
            xty[(q, l as usize)] += r[q] as f64;
        }
    }
    Normal { xtx, xty, ymean }
}

fn solve(ne: &Normal, lambda: f64) -> Result<DMatrix<f64>> {
    let f = ne.xtx.nrows();
    let scale = (ne.xtx.trace() / f as f64).max(1e-12);
    let a = &ne.xtx + DMatrix::identity(f, f) * (lambda * scale);
    let ch = a
        .cholesky()
        .context("the ridge system is not positive definite (features with NaN or inf?)")?;
    Ok(ch.solve(&ne.xty))
}

impl Probe {
    /// Class scores `[n, c]` of raw (unstandardised) features `x[n, f]`.
    pub fn scores(&self, x: &[f32], n: usize) -> DMatrix<f64> {
        let f = self.mean.len();
        let xs = standardised(x, n, f, &self.mean, &self.inv_std);
        let xm = DMatrix::from_row_slice(n, f, &xs.iter().map(|&v| v as f64).collect::<Vec<_>>());
        let mut s = xm * &self.w;
        for mut row in s.row_iter_mut() {
            row += self.b.transpose();
        }
        s
    }

    /// Top-1 and top-5 accuracy on `x[n, f]` with `labels`.
    pub fn accuracy(&self, x: &[f32], labels: &[u32]) -> (f64, f64) {
        let n = labels.len();
        if n == 0 {
            return (0.0, 0.0);
        }
        let s = self.scores(x, n);
        let (mut t1, mut t5) = (0usize, 0usize);
        for (i, &l) in labels.iter().enumerate() {
            let truth = s[(i, l as usize)];
            // Rank of the true class: classes scoring strictly higher (ties go to the lower index).
            let rank = (0..s.ncols())
                .filter(|&j| {
                    let v = s[(i, j)];
                    v > truth || (v == truth && j < l as usize)
                })
                .count();
            t1 += (rank == 0) as usize;
            t5 += (rank < 5) as usize;
        }
        (t1 as f64 / n as f64, t5 as f64 / n as f64)
    }
}

/// Fits the ridge probe on `x[n, f]` with `lambda` (relative to the mean diagonal of X^T X).
pub fn fit(x: &[f32], labels: &[u32], f: usize, classes: usize, lambda: f64) -> Result<Probe> {
    let n = labels.len();
    ensure!(n > 0 && f > 0, "the linear probe needs features to fit");
    ensure!(
        x.len() == n * f,
        "probe features hold {} values, expected {n} x {f}",
        x.len()
    );
    if let Some(l) = labels.iter().find(|&&l| l as usize >= classes) {
        bail!("label {l} out of range for {classes} classes");
    }
    let (mean, inv_std) = standardise_stats(x, n, f);
    let xs = standardised(x, n, f, &mean, &inv_std);
    let ne = normal_equations(&xs, labels, n, f, classes);
    let w = solve(&ne, lambda)?;
    Ok(Probe {
        mean,
        inv_std,
        w,
        b: ne.ymean.clone(),
    })
}

/// Whether training row `i` belongs to the validation fifth (a hash of the index, so the
/// split does not follow any period in the dataset's order).
pub fn in_validation(i: usize) -> bool {
    let mut z = (i as u64).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)).is_multiple_of(5)
}

/// The whole protocol: lambda by validation on a deterministic fifth of the training rows
/// ([`in_validation`]), refit on all of them, score on the test rows.
pub fn linear_probe(
    train: &[f32],
    train_labels: &[u32],
    test: &[f32],
    test_labels: &[u32],
    f: usize,
    classes: usize,
) -> Result<ProbeScore> {
    let n = train_labels.len();
    ensure!(
        n >= 10,
        "the linear probe needs at least 10 training images (got {n})"
    );
    ensure!(
        !test_labels.is_empty(),
        "the linear probe needs test images"
    );
    ensure!(
        test.len() == test_labels.len() * f,
        "test features hold {} values, expected {} x {f}",
        test.len(),
        test_labels.len()
    );
    let (mut fx, mut fl, mut vx, mut vl) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (i, (r, &l)) in train.chunks_exact(f).zip(train_labels).enumerate() {
        if in_validation(i) {
            vx.extend_from_slice(r);
            vl.push(l);
        } else {
            fx.extend_from_slice(r);
            fl.push(l);
        }
    }
    ensure!(
        !vl.is_empty() && !fl.is_empty(),
        "the linear probe's validation split came out empty"
    );
    let mut best = (f64::NEG_INFINITY, f64::NAN);
    let mut last_err = None;
    for &lam in &RIDGE_GRID {
        let p = match fit(&fx, &fl, f, classes, lam) {
            Ok(p) => p,
            Err(e) => {
                last_err = Some(e);
                continue;
            }
        };
        let (a, _) = p.accuracy(&vx, &vl);
        // Ties go to the larger lambda (the smoother probe).
        if a >= best.0 {
            best = (a, lam);
        }
    }
    if best.1.is_nan() {
        return Err(last_err
            .unwrap_or_else(|| anyhow::anyhow!("no ridge lambda gave a probe"))
            .context("every ridge lambda failed"));
    }
    let p = fit(train, train_labels, f, classes, best.1)?;
    let (top1, top5) = p.accuracy(test, test_labels);
    Ok(ProbeScore {
        top1,
        top5,
        lambda: best.1,
        val_top1: best.0,
        features: f,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// `c` classes in `f` dims: class means far apart on random directions, small noise.
    fn blobs(
        rng: &mut ChaCha8Rng,
        n: usize,
        f: usize,
        c: usize,
        noise: f32,
    ) -> (Vec<f32>, Vec<u32>) {
        let mut centers = ChaCha8Rng::seed_from_u64(99);
        let means: Vec<f32> = (0..c * f).map(|_| centers.gen_range(-3.0..3.0)).collect();
        let mut x = Vec::new();
        let mut y = Vec::new();
        for i in 0..n {
            let l = (i % c) as u32;
            for q in 0..f {
                x.push(means[l as usize * f + q] + noise * rng.gen_range(-1.0f32..1.0));
            }
            y.push(l);
        }
        (x, y)
    }

    #[test]
    fn separable_features_score_one() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let (f, c) = (12, 7);
        let (tr, trl) = blobs(&mut rng, 350, f, c, 0.3);
        let (te, tel) = blobs(&mut rng, 140, f, c, 0.3);
        let s = linear_probe(&tr, &trl, &te, &tel, f, c).unwrap();
        assert_eq!((s.top1, s.top5), (1.0, 1.0), "{s:?}");
    }

    #[test]
    fn cyclic_labels_and_collinear_features_still_fit() {
        // Labels cycling with period 10 (as the built-in dataset stores them) and features
        // duplicated with an exact linear dependency: the validation fifth must hold every
        // class, and the singular Gram matrix must not stop the probe.
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let (f, c) = (6, 10);
        let dup = |x: Vec<f32>| -> Vec<f32> {
            x.chunks(f)
                .flat_map(|r| {
                    let mut v = r.to_vec();
                    v.extend(r.iter().map(|a| 2.0 * a + 1.0));
                    v.push(r.iter().sum());
                    v
                })
                .collect()
        };
        let (tr, trl) = blobs(&mut rng, 500, f, c, 0.2);
        let (te, tel) = blobs(&mut rng, 100, f, c, 0.2);
        let s = linear_probe(&dup(tr), &trl, &dup(te), &tel, 2 * f + 1, c).unwrap();
        assert_eq!(s.top1, 1.0, "{s:?}");
        assert_eq!(s.val_top1, 1.0, "{s:?}");
        let val: Vec<u32> = (0..500)
            .filter(|&i| in_validation(i))
            .map(|i| trl[i])
            .collect();
        assert!((0..c as u32).all(|k| val.contains(&k)));
    }

    #[test]
    fn shuffled_labels_score_near_chance() {
        // Features carry no information about the labels: the probe cannot beat chance by much,
        // and top-5 of 10 classes sits near 50%.
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let (f, c) = (8, 10);
        let (tr, _) = blobs(&mut rng, 500, f, c, 1.0);
        let (te, _) = blobs(&mut rng, 500, f, c, 1.0);
        let trl: Vec<u32> = (0..500).map(|_| rng.gen_range(0..c as u32)).collect();
        let tel: Vec<u32> = (0..500).map(|_| rng.gen_range(0..c as u32)).collect();
        let s = linear_probe(&tr, &trl, &te, &tel, f, c).unwrap();
        assert!(s.top1 < 0.2, "{s:?}");
        assert!(s.top5 > 0.35 && s.top5 < 0.65, "{s:?}");
    }

    #[test]
    fn ridge_solution_matches_normal_equations() {
        // Two features, two classes: compare W against a direct f64 solve of the 2x2 system.
        let x = [1.0f32, 0.0, 0.0, 1.0, 1.0, 1.0, -1.0, 0.5, 0.2, -0.3];
        let y = [0u32, 1, 0, 1, 0];
        let p = fit(&x, &y, 2, 2, 1e-3).unwrap();
        let (mean, inv) = standardise_stats(&x, 5, 2);
        let xs: Vec<f64> = x
            .chunks(2)
            .flat_map(|r| {
                [
                    (r[0] as f64 - mean[0]) * inv[0],
                    (r[1] as f64 - mean[1]) * inv[1],
                ]
            })
            .collect();
        let mut a = [[0.0f64; 2]; 2];
        let mut bcol = [0.0f64; 2];
        for i in 0..5 {
            for r in 0..2 {
                for c in 0..2 {
                    a[r][c] += xs[2 * i + r] * xs[2 * i + c];
                }
                bcol[r] += xs[2 * i + r] * if y[i] == 0 { 1.0 } else { 0.0 };
            }
        }
        let lam = 1e-3 * (a[0][0] + a[1][1]) / 2.0;
        a[0][0] += lam;
        a[1][1] += lam;
        let det = a[0][0] * a[1][1] - a[0][1] * a[1][0];
        let w0 = (a[1][1] * bcol[0] - a[0][1] * bcol[1]) / det;
        let w1 = (a[0][0] * bcol[1] - a[1][0] * bcol[0]) / det;
        assert!(
            (p.w[(0, 0)] - w0).abs() < 1e-4 * (1.0 + w0.abs()),
            "{} vs {w0}",
            p.w[(0, 0)]
        );
        assert!(
            (p.w[(1, 0)] - w1).abs() < 1e-4 * (1.0 + w1.abs()),
            "{} vs {w1}",
            p.w[(1, 0)]
        );
        assert!((p.b[0] - 0.6).abs() < 1e-12);
    }

    #[test]
    fn bad_input_is_an_error() {
        assert!(fit(&[1.0, 2.0], &[0, 5], 1, 2, 1e-3).is_err());
        assert!(linear_probe(&[0.0; 4], &[0; 4], &[0.0], &[0], 1, 1).is_err());
    }
}
