//! Label-free quality signals (method.md, "Label-free quality signals") and the agreement of
//! the teacher's prototype assignment with labels (NMI, purity).
//!
//! - [`rankme`]: the effective rank of a feature matrix `Z[n, d]` (Garrido et al. 2023), from
//!   the singular values of `Z`, computed in f64 as the square roots of the eigenvalues of the
//!   `d x d` Gram matrix `Z^T Z` (cheap for the small widths here: `d` is 96 for small32).
//! - [`teacher_spread`]: the mean per-image entropy of the teacher's distributions against the
//!   entropy of their mean; their difference is the mean KL of each row to the mean (the mutual
//!   information between the image and the prototype), 0 for an input-independent teacher.
//! - [`cluster_agreement`]: NMI (arithmetic normalisation, `2 I / (H(C) + H(Y))`) and purity of
//!   an assignment against labels.
use std::collections::BTreeMap;

use anyhow::{ensure, Result};
use nalgebra::DMatrix;
use serde::{Deserialize, Serialize};

/// The floor added to each normalised singular value (method.md: `p_k = s_k / sum(s) + 1e-7`).
pub const RANKME_EPS: f64 = 1e-7;

/// RankMe of `z[n, d]` (rows are samples): `exp(-sum_k p_k ln p_k)` with `p_k = s_k / sum(s) +
/// 1e-7` over the `min(n, d)` singular values `s_k`. In `[1, min(n, d)]` (up to the epsilon); an all-zero
/// matrix (no direction at all) counts as rank 1.
pub fn rankme(z: &[f32], n: usize, d: usize) -> Result<f64> {
    ensure!(
        n > 0 && d > 0,
        "RankMe needs at least one feature row and column, got {n} x {d}"
    );
    ensure!(
        z.len() == n * d,
        "RankMe: features hold {} values, expected {n} x {d}",
        z.len()
    );
    ensure!(
        z.iter().all(|x| x.is_finite()),
        "RankMe: the features hold a non-finite value"
    );
    // The smaller Gram matrix in f64: Z^T Z (d x d) or, with fewer rows than columns, Z Z^T
    // (n x n); both have the min(n, d) squared singular values as eigenvalues.
    let g = if n >= d {
        let mut g = vec![0.0f64; d * d];
        for row in z.chunks_exact(d) {
            for i in 0..d {
                let ri = row[i] as f64;
                let gi = &mut g[i * d..(i + 1) * d];
                for (j, &x) in row.iter().enumerate().skip(i) {
                    gi[j] += ri * x as f64;
                }
            }
        }
        symmetric_from_upper(g, d)
    } else {
        let mut g = vec![0.0f64; n * n];
        for i in 0..n {
            let ri = &z[i * d..(i + 1) * d];
            for j in i..n {
                let rj = &z[j * d..(j + 1) * d];
                g[i * n + j] = ri.iter().zip(rj).map(|(&a, &b)| a as f64 * b as f64).sum();
            }
        }
        symmetric_from_upper(g, n)
    };
    let eig = g.symmetric_eigen();
    let s: Vec<f64> = eig.eigenvalues.iter().map(|&l| l.max(0.0).sqrt()).collect();
    Ok(rankme_of_singular_values(&s))
}

/// The symmetric matrix whose upper triangle (row-major `m x m`) is given.
fn symmetric_from_upper(mut g: Vec<f64>, m: usize) -> DMatrix<f64> {
    for i in 0..m {
        for j in 0..i {
            g[i * m + j] = g[j * m + i];
        }
    }
    DMatrix::from_row_slice(m, m, &g)
}

/// RankMe of given singular values (the formula alone; all-zero values give 1).
pub fn rankme_of_singular_values(s: &[f64]) -> f64 {
    let total: f64 = s.iter().sum();
    if total <= 0.0 || s.is_empty() {
        return 1.0;
    }
    let h: f64 = s
        .iter()
        .map(|&x| {
            let p = x / total + RANKME_EPS;
            -p * p.ln()
        })
        .sum();
    h.exp().max(1.0)
}

/// The teacher's spread over a set of probability rows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TeacherSpread {
    /// Mean over the rows of H(p_i), nats.
    pub row_entropy: f64,
    /// H(mean_i p_i), nats.
    pub mean_entropy: f64,
}

impl TeacherSpread {
    /// `mean_entropy - row_entropy` = mean_i KL(p_i || mean): 0 when every row is the same
    /// distribution (the teacher ignores its input).
    pub fn kl_to_mean(&self) -> f64 {
        self.mean_entropy - self.row_entropy
    }
}

/// [`TeacherSpread`] of `probs[n, k]` (each row a distribution), accumulated in f64.
pub fn teacher_spread(probs: &[f32], n: usize, k: usize) -> TeacherSpread {
    let mut mean = vec![0.0f64; k];
    let mut h = 0.0f64;
    for row in probs.chunks_exact(k).take(n) {
        for (m, &p) in mean.iter_mut().zip(row) {
            let p = p as f64;
            *m += p;
            if p > 0.0 {
                h -= p * p.ln();
            }
        }
    }
    let w = 1.0 / n.max(1) as f64;
    let hm: f64 = mean
        .iter()
        .map(|&m| m * w)
        .filter(|&m| m > 0.0)
        .map(|m| -m * m.ln())
        .sum();
    TeacherSpread {
        row_entropy: h * w,
        mean_entropy: hm,
    }
}

/// How well an assignment (the teacher's argmax prototype) agrees with the labels.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterAgreement {
    /// Normalised mutual information `2 I(C; Y) / (H(C) + H(Y))` in [0, 1] (0 when both
    /// entropies are 0).
    pub nmi: f64,
    /// Fraction of images whose cluster's most common label is their own.
    pub purity: f64,
}

/// NMI and purity of `assign` (cluster ids) against `labels`, one of each per image.
pub fn cluster_agreement(assign: &[u32], labels: &[u32]) -> Result<ClusterAgreement> {
    ensure!(
        assign.len() == labels.len(),
        "{} assignments for {} labels",
        assign.len(),
        labels.len()
    );
    ensure!(!assign.is_empty(), "NMI / purity need at least one image");
    // Contingency counts of the (cluster, class) pairs that occur (K x classes can be large);
    // ordered maps so that the sums run in one order (bit-identical results run to run).
    let mut table: BTreeMap<(u32, u32), u64> = BTreeMap::new();
    let mut pc: BTreeMap<u32, u64> = BTreeMap::new();
    let mut py: BTreeMap<u32, u64> = BTreeMap::new();
    for (&c, &y) in assign.iter().zip(labels) {
        *table.entry((c, y)).or_default() += 1;
        *pc.entry(c).or_default() += 1;
        *py.entry(y).or_default() += 1;
    }
    let n = assign.len() as f64;
    let h = |counts: &BTreeMap<u32, u64>| -> f64 {
        counts
            .values()
            .map(|&c| {
                let p = c as f64 / n;
                -p * p.ln()
            })
            .sum()
    };
    let (hc, hy) = (h(&pc), h(&py));
    let mut mi = 0.0f64;
    let mut best: BTreeMap<u32, u64> = BTreeMap::new();
    for (&(c, y), &t) in &table {
        let pxy = t as f64 / n;
        mi += pxy * (t as f64 * n / (pc[&c] as f64 * py[&y] as f64)).ln();
        let b = best.entry(c).or_default();
        *b = (*b).max(t);
    }
    let pure: u64 = best.values().sum();
    let nmi = if hc + hy > 0.0 {
        (2.0 * mi / (hc + hy)).clamp(0.0, 1.0)
    } else {
        0.0
    };
    Ok(ClusterAgreement {
        nmi,
        purity: pure as f64 / n,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// An n x d matrix with the given singular values: U diag(s) V^T with orthonormal columns
    /// from QR of random matrices (f64).
    fn with_singular_values(n: usize, d: usize, s: &[f64], seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let r = s.len();
        let a = DMatrix::from_fn(n, r, |_, _| rng.gen_range(-1.0..1.0f64));
        let b = DMatrix::from_fn(d, r, |_, _| rng.gen_range(-1.0..1.0f64));
        let u = a.qr().q();
        let v = b.qr().q();
        let z = &u * DMatrix::from_diagonal(&nalgebra::DVector::from_row_slice(s)) * v.transpose();
        let mut out = vec![0.0f32; n * d];
        for i in 0..n {
            for j in 0..d {
                out[i * d + j] = z[(i, j)] as f32;
            }
        }
        out
    }

    /// The f64 reference: singular values from nalgebra's SVD of Z itself (another algorithm than
    /// the Gram eigenvalues), then the formula written out again.
    fn rankme_reference(z: &[f32], n: usize, d: usize) -> f64 {
        let m = DMatrix::from_fn(n, d, |i, j| z[i * d + j] as f64);
        let s = m.svd(false, false).singular_values;
        let total: f64 = s.iter().sum();
        let mut h = 0.0;
        for &x in s.iter() {
            let p = x / total + 1e-7;
            h += p * p.ln();
        }
        (-h).exp()
    }

    #[test]
    fn rankme_of_known_spectra() {
        // Equal singular values: RankMe = r (up to the epsilon).
        for r in [1usize, 3, 8] {
            let z = with_singular_values(40, 8, &vec![2.5; r], r as u64);
            let got = rankme(&z, 40, 8).unwrap();
            assert!((got - r as f64).abs() < 1e-3 * r as f64, "r {r}: {got}");
        }
        // Unequal: exp of the entropy of s / sum(s), written out.
        let s = [4.0, 2.0, 1.0, 1.0];
        let z = with_singular_values(30, 6, &s, 9);
        let p: Vec<f64> = s.iter().map(|x| x / 8.0).collect();
        let want = (-p.iter().map(|p| p * p.ln()).sum::<f64>()).exp();
        let got = rankme(&z, 30, 6).unwrap();
        assert!((got - want).abs() < 2e-3, "{got} vs {want}");
    }

    #[test]
    fn rankme_matches_svd_reference_on_random_features() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for &(n, d) in &[(50usize, 12usize), (7, 16), (200, 32)] {
            // Anisotropic: column j scaled by 1 / (1 + j).
            let z: Vec<f32> = (0..n * d)
                .map(|i| rng.gen_range(-1.0..1.0f32) / (1 + i % d) as f32 + 0.3)
                .collect();
            let got = rankme(&z, n, d).unwrap();
            let want = rankme_reference(&z, n, d);
            // The Gram route squares the condition number: tiny singular values lose digits,
            // but they carry p_k ~ 1e-7 and move RankMe by far less than this tolerance.
            assert!(
                (got - want).abs() < 1e-6 * want.max(1.0) + 1e-5,
                "{n}x{d}: {got} vs {want}"
            );
            assert!(got >= 1.0 && got <= n.min(d) as f64 + 1e-3);
        }
    }

    #[test]
    fn rankme_of_collapsed_features_is_one() {
        // Every row the same vector: rank 1.
        let row: Vec<f32> = (0..10).map(|j| j as f32 - 4.5).collect();
        let z: Vec<f32> = (0..25).flat_map(|_| row.clone()).collect();
        let got = rankme(&z, 25, 10).unwrap();
        assert!((got - 1.0).abs() < 1e-4, "{got}");
        assert_eq!(rankme(&[0.0; 12], 3, 4).unwrap(), 1.0);
    }

    #[test]
    fn rankme_rejects_bad_input() {
        let e = rankme(&[1.0; 5], 2, 3).unwrap_err().to_string();
        assert!(e.contains("expected 2 x 3"), "{e}");
        let e = rankme(&[1.0, f32::NAN], 1, 2).unwrap_err().to_string();
        assert!(e.contains("non-finite"), "{e}");
        assert!(rankme(&[], 0, 3).is_err());
    }

    #[test]
    fn teacher_spread_by_hand() {
        // Two one-hot rows on different prototypes: rows have entropy 0, the mean is (1/2, 1/2).
        let s = teacher_spread(&[1.0, 0.0, 0.0, 1.0], 2, 2);
        assert_eq!(s.row_entropy, 0.0);
        assert!((s.mean_entropy - 2f64.ln()).abs() < 1e-12);
        assert!((s.kl_to_mean() - 2f64.ln()).abs() < 1e-12);
        // Identical rows: the KL to the mean is 0 whatever the rows are.
        let s = teacher_spread(&[0.7, 0.2, 0.1, 0.7, 0.2, 0.1], 2, 3);
        assert!(s.kl_to_mean().abs() < 1e-7, "{}", s.kl_to_mean());
    }

    #[test]
    fn teacher_spread_matches_explicit_kl_to_mean() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let (n, k) = (17, 9);
        let mut p = vec![0.0f32; n * k];
        for r in p.chunks_mut(k) {
            for x in r.iter_mut() {
                *x = rng.gen_range(0.01..1.0f32).powi(3);
            }
            let s: f32 = r.iter().sum();
            r.iter_mut().for_each(|x| *x /= s);
        }
        let s = teacher_spread(&p, n, k);
        // Reference: mean over rows of KL(p_i || mean), in f64 from the definition.
        let mut mean = vec![0.0f64; k];
        for r in p.chunks(k) {
            for (m, &x) in mean.iter_mut().zip(r) {
                *m += x as f64 / n as f64;
            }
        }
        let kl: f64 = p
            .chunks(k)
            .map(|r| {
                r.iter()
                    .zip(&mean)
                    .map(|(&x, &m)| x as f64 * ((x as f64).ln() - m.ln()))
                    .sum::<f64>()
            })
            .sum::<f64>()
            / n as f64;
        assert!(
            (s.kl_to_mean() - kl).abs() < 1e-6,
            "{} vs {kl}",
            s.kl_to_mean()
        );
        assert!(s.kl_to_mean() > 0.01);
    }

    #[test]
    fn cluster_agreement_by_hand() {
        // Perfect clustering under a relabelling: NMI 1, purity 1.
        let a = cluster_agreement(&[5, 5, 2, 2, 9, 9], &[0, 0, 1, 1, 2, 2]).unwrap();
        assert!((a.nmi - 1.0).abs() < 1e-12 && a.purity == 1.0, "{a:?}");
        // One cluster for everything: I = 0, so NMI 0; purity = the largest class share.
        let a = cluster_agreement(&[3, 3, 3, 3], &[0, 0, 0, 1]).unwrap();
        assert_eq!(a.nmi, 0.0);
        assert_eq!(a.purity, 0.75);
        // Clusters {0,0,1}, {1}: by hand, n = 4, counts (c0: y0 2, y1 1), (c1: y1 1).
        // H(C) = H(3/4, 1/4), H(Y) = ln 2, I = sum p(c,y) ln(p(c,y) / p(c) p(y)):
        // (1/2) ln((1/2)/(3/8)) + (1/4) ln((1/4)/(3/8)) + (1/4) ln((1/4)/(1/8)).
        let a = cluster_agreement(&[0, 0, 0, 1], &[0, 0, 1, 1]).unwrap();
        let hc = -(0.75f64 * 0.75f64.ln() + 0.25 * 0.25f64.ln());
        let hy = 2f64.ln();
        let i = 0.5 * (0.5f64 / 0.375).ln()
            + 0.25 * (0.25f64 / 0.375).ln()
            + 0.25 * (0.25f64 / 0.125).ln();
        assert!((a.nmi - 2.0 * i / (hc + hy)).abs() < 1e-12, "{a:?}");
        assert_eq!(a.purity, 0.75);
    }

    #[test]
    fn cluster_agreement_matches_f64_reference() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let n = 500;
        let labels: Vec<u32> = (0..n).map(|_| rng.gen_range(0..6)).collect();
        // Noisy clustering: the label (merged in pairs) most of the time, else random of 20.
        let assign: Vec<u32> = labels
            .iter()
            .map(|&y| {
                if rng.gen_bool(0.7) {
                    y / 2
                } else {
                    rng.gen_range(0..20)
                }
            })
            .collect();
        let got = cluster_agreement(&assign, &labels).unwrap();
        // Reference from joint probabilities as f64 maps, I = H(C) + H(Y) - H(C, Y).
        let mut joint = std::collections::HashMap::new();
        let mut mc = std::collections::HashMap::new();
        let mut my = std::collections::HashMap::new();
        for (&c, &y) in assign.iter().zip(&labels) {
            *joint.entry((c, y)).or_insert(0.0f64) += 1.0 / n as f64;
            *mc.entry(c).or_insert(0.0f64) += 1.0 / n as f64;
            *my.entry(y).or_insert(0.0f64) += 1.0 / n as f64;
        }
        let ent = |v: Vec<f64>| -> f64 { -v.iter().map(|p| p * p.ln()).sum::<f64>() };
        let (hc, hy) = (
            ent(mc.values().copied().collect()),
            ent(my.values().copied().collect()),
        );
        let hj = ent(joint.values().copied().collect());
        let nmi = 2.0 * (hc + hy - hj) / (hc + hy);
        assert!((got.nmi - nmi).abs() < 1e-9, "{} vs {nmi}", got.nmi);
        let mut best = std::collections::HashMap::new();
        for (&(c, _), &p) in &joint {
            let b = best.entry(c).or_insert(0.0f64);
            *b = f64::max(*b, p);
        }
        let purity: f64 = best.values().sum();
        assert!((got.purity - purity).abs() < 1e-9);
        assert!(got.nmi > 0.1 && got.nmi < 0.9, "{}", got.nmi);
    }

    #[test]
    fn cluster_agreement_rejects_bad_input() {
        assert!(cluster_agreement(&[], &[]).is_err());
        let e = cluster_agreement(&[1, 2], &[0]).unwrap_err().to_string();
        assert!(e.contains("2 assignments for 1 labels"), "{e}");
    }
}
