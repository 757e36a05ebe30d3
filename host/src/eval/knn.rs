//! Weighted k-NN classification on L2-normalised features (DINO's protocol): cosine similarity,
//! the top-k training neighbours vote with weight exp(sim / T), T = 0.07.
use anyhow::{bail, Result};
use rayon::prelude::*;

use crate::backend::cpu::gemm::{matmul, Op};

/// The DINO k-NN temperature.
pub const KNN_TEMPERATURE: f32 = 0.07;
/// The k values reported (k = 20 is the headline number).
pub const KNN_KS: [usize; 4] = [10, 20, 100, 200];

/// Accuracy (in [0, 1]) for one k.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KnnScore {
    pub k: usize,
    pub top1: f64,
}

/// L2-normalises each row of `x` ([n, d]) in place; zero rows stay zero.
pub fn l2_normalise_rows(x: &mut [f32], d: usize) {
    x.par_chunks_mut(d.max(1)).for_each(|r| {
        let n = r
            .iter()
            .map(|v| (*v as f64) * (*v as f64))
            .sum::<f64>()
            .sqrt();
        if n > 0.0 {
            let inv = (1.0 / n) as f32;
            r.iter_mut().for_each(|v| *v *= inv);
        }
    });
}

/// k-NN accuracy of `test` against `train` (both [n, d], normalised here) for every k in `ks`
/// (k larger than the training set is clamped to it).
#[allow(clippy::too_many_arguments)]
pub fn knn_accuracy(
    train: &[f32],
    train_labels: &[u32],
    test: &[f32],
    test_labels: &[u32],
    d: usize,
    num_classes: usize,
    ks: &[usize],
    temperature: f32,
) -> Result<Vec<KnnScore>> {
    let ntr = train_labels.len();
    let nte = test_labels.len();
    if ntr == 0 || nte == 0 {
        bail!("k-NN needs a non-empty training and test set (got {ntr} and {nte})");
    }
    if train.len() != ntr * d || test.len() != nte * d {
        bail!("k-NN feature shapes do not match the label counts");
    }
    if let Some(l) = train_labels
        .iter()
        .chain(test_labels)
        .find(|&&l| l as usize >= num_classes)
    {
        bail!("label {l} out of range for {num_classes} classes");
    }
    let mut tr = train.to_vec();
    let mut te = test.to_vec();
    l2_normalise_rows(&mut tr, d);
    l2_normalise_rows(&mut te, d);
    let kmax = ks.iter().copied().max().unwrap_or(1).clamp(1, ntr);
    let mut correct = vec![0usize; ks.len()];
    // Chunks of test rows keep the similarity block small (chunk x ntr floats).
    let chunk = 256;
    let mut sims = vec![0.0f32; chunk * ntr];
    for (ci, rows) in te.chunks(chunk * d).enumerate() {
        let m = rows.len() / d;
        matmul(
            m,
            ntr,
            d,
            rows,
            Op::N,
            &tr,
            Op::T,
            &mut sims[..m * ntr],
            false,
        );
        let per_row: Vec<Vec<bool>> = sims[..m * ntr]
            .par_chunks(ntr)
            .enumerate()
            .map(|(r, s)| {
                let truth = test_labels[ci * chunk + r] as usize;
                let mut idx: Vec<u32> = (0..ntr as u32).collect();
                // Top kmax by similarity; ties broken by index so results are deterministic.
                let cmp =
                    |a: &u32, b: &u32| s[*b as usize].total_cmp(&s[*a as usize]).then(a.cmp(b));
                if kmax < ntr {
                    idx.select_nth_unstable_by(kmax - 1, cmp);
                    idx.truncate(kmax);
                }
                idx.sort_by(cmp);
                ks.iter()
                    .map(|&k| {
                        let k = k.clamp(1, ntr);
                        let mut votes = vec![0.0f64; num_classes];
                        for &j in &idx[..k] {
                            votes[train_labels[j as usize] as usize] +=
                                ((s[j as usize] / temperature) as f64).exp();
                        }
                        let best = (0..num_classes)
                            .max_by(|&a, &b| votes[a].total_cmp(&votes[b]).then(b.cmp(&a)))
                            .unwrap_or(0);
                        best == truth
                    })
                    .collect()
            })
            .collect();
        for r in per_row {
            for (c, ok) in correct.iter_mut().zip(r) {
                *c += ok as usize;
            }
        }
    }
    Ok(ks
        .iter()
        .zip(correct)
        .map(|(&k, c)| KnnScore {
            k,
            top1: c as f64 / nte as f64,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn separable_clusters_score_one_and_wrong_labels_score_zero() {
        // Three classes along three axes: every test point's neighbours share its class.
        let d = 3;
        let mut tr = Vec::new();
        let mut trl = Vec::new();
        for i in 0..60u32 {
            let c = i % 3;
            let mut v = [
                0.05 * ((i * 7 % 5) as f32),
                0.03 * ((i * 3 % 4) as f32),
                0.02,
            ];
            v[c as usize] += 1.0;
            tr.extend_from_slice(&v);
            trl.push(c);
        }
        let te = vec![2.0, 0.1, 0.0, 0.0, 3.0, 0.2, 0.1, 0.0, 1.0];
        let tel = vec![0, 1, 2];
        let s = knn_accuracy(&tr, &trl, &te, &tel, d, 3, &[1, 10, 20], KNN_TEMPERATURE).unwrap();
        assert!(s.iter().all(|x| x.top1 == 1.0), "{s:?}");
        // Wrong labels for the test points: accuracy must drop to 0.
        let s = knn_accuracy(&tr, &trl, &te, &[1, 2, 0], d, 3, &[10], KNN_TEMPERATURE).unwrap();
        assert_eq!(s[0].top1, 0.0);
    }

    #[test]
    fn weighted_vote_prefers_close_minority() {
        // One very close neighbour of class 1 against two far ones of class 0 at k = 3:
        // exp(sim/0.07) weighting lets the close one win.
        let tr = vec![1.0, 0.0, 0.6, 0.8, 0.6, -0.8];
        let trl = vec![1, 0, 0];
        let te = vec![1.0, 0.01];
        let s = knn_accuracy(&tr, &trl, &te, &[1], 2, 2, &[3], KNN_TEMPERATURE).unwrap();
        assert_eq!(s[0].top1, 1.0);
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert!(knn_accuracy(&[], &[], &[1.0], &[0], 1, 1, &[1], 0.07).is_err());
        assert!(knn_accuracy(&[1.0], &[3], &[1.0], &[0], 1, 2, &[1], 0.07).is_err());
    }
}
