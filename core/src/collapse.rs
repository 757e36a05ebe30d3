//! Collapse signals read off the teacher and student distributions of a batch.
//!
//! The two failure modes DINO guards against (method.md, Evaluation): the teacher goes uniform
//! (row entropy and loss stuck at ln K), or one prototype takes all the mass (entropy of the mean
//! distribution near 0, max mean mass near 1). A healthy run has a low per-row entropy (sharp
//! targets) and a high entropy of the mean (many prototypes in use).
use crate::real::Real;

/// Per-batch collapse diagnostics.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CollapseStats<T> {
    /// `H(mean_b P_t)`: ln K when the batch uses every prototype equally, 0 when one wins all.
    pub entropy_of_mean: T,
    /// `mean_b H(P_t,b)`: ln K for a uniform teacher, 0 for one-hot targets.
    pub mean_row_entropy: T,
    /// The largest entry of `mean_b P_t`.
    pub max_mean_mass: T,
    /// Which prototype holds `max_mean_mass`.
    pub argmax_mean: usize,
    /// Mean of `KL(P_t,q || P_s,v)` over the loss's pairs and the batch.
    pub mean_kl: T,
    /// `ln K`, the uniform-collapse level of the loss and of both entropies.
    pub ln_k: T,
}

/// Shannon entropy `-sum p ln p` of one distribution (with `0 ln 0 = 0`).
pub fn entropy<T: Real>(p: &[T]) -> T {
    let mut h = T::ZERO;
    for &x in p {
        if x > T::ZERO {
            h -= x * x.ln();
        }
    }
    h
}

/// `KL(p || q) = sum p (ln p - ln q)` given `ln q` (terms with `p = 0` contribute 0).
pub fn kl_divergence_row<T: Real>(p: &[T], log_q: &[T]) -> T {
    let mut s = T::ZERO;
    for (&x, &lq) in p.iter().zip(log_q) {
        if x > T::ZERO {
            s += x * (x.ln() - lq);
        }
    }
    s
}

/// Collapse statistics from the teacher target rows `p_t[rows, k]`; `mean_buf[k]` is scratch
/// (left holding `mean_b P_t`). `mean_kl` comes from the caller, who has the student rows (the
/// loss composite obtains it as `loss - mean_row_entropy`, an identity of the multi-crop pairs).
pub fn teacher_collapse_stats<T: Real>(
    p_t: &[T],
    rows: usize,
    k: usize,
    mean_buf: &mut [T],
    mean_kl: T,
) -> CollapseStats<T> {
    debug_assert!(p_t.len() >= rows * k);
    let mut h_rows = T::ZERO;
    for row in p_t.chunks_exact(k).take(rows) {
        h_rows += entropy(row);
    }
    collapse_stats_given_row_entropy(p_t, rows, k, mean_buf, h_rows, mean_kl)
}

/// [`teacher_collapse_stats`] for a caller that already has `row_entropy_sum`, the sum over
/// the rows of `H(P_t,b)` (a backend that computed the row entropies in parallel).
pub fn collapse_stats_given_row_entropy<T: Real>(
    p_t: &[T],
    rows: usize,
    k: usize,
    mean_buf: &mut [T],
    row_entropy_sum: T,
    mean_kl: T,
) -> CollapseStats<T> {
    debug_assert!(p_t.len() >= rows * k && mean_buf.len() >= k);
    let mean = &mut mean_buf[..k];
    mean.fill(T::ZERO);
    let w = T::ONE / T::from_usize(rows.max(1));
    for row in p_t.chunks_exact(k).take(rows) {
        for (m, &x) in mean.iter_mut().zip(row) {
            *m += w * x;
        }
    }
    collapse_stats_of_mean(mean, row_entropy_sum * w, mean_kl)
}

/// [`CollapseStats`] from the batch's mean teacher distribution `mean[K]` and the mean row
/// entropy (a data-parallel step has these as sums over ranks, not the rows themselves).
pub fn collapse_stats_of_mean<T: Real>(
    mean: &[T],
    mean_row_entropy: T,
    mean_kl: T,
) -> CollapseStats<T> {
    let mut max_mass = T::NEG_INFINITY;
    let mut argmax = 0;
    for (i, &m) in mean.iter().enumerate() {
        if m > max_mass {
            max_mass = m;
            argmax = i;
        }
    }
    CollapseStats {
        entropy_of_mean: entropy(mean),
        mean_row_entropy,
        max_mean_mass: max_mass,
        argmax_mean: argmax,
        mean_kl,
        ln_k: T::from_usize(mean.len()).ln(),
    }
}

/// Mean `KL(P_t,q || P_s,v)` over the multi-crop pairs `(q in {0, 1}, v != q)` and the batch,
/// from explicit rows: crop-major `p_t[2 * batch, k]` and student log-probabilities
/// `log_p_s[n_crops * batch, k]`.
pub fn multicrop_mean_kl<T: Real>(
    p_t: &[T],
    log_p_s: &[T],
    n_crops: usize,
    batch: usize,
    k: usize,
) -> T {
    let mut s = T::ZERO;
    let mut count = 0usize;
    for q in 0..2 {
        for v in (0..n_crops).filter(|&v| v != q) {
            for b in 0..batch {
                let t = (q * batch + b) * k;
                let st = (v * batch + b) * k;
                s += kl_divergence_row(&p_t[t..t + k], &log_p_s[st..st + k]);
                count += 1;
            }
        }
    }
    s / T::from_usize(count.max(1))
}

/// The uniform-collapse signature: the loss within `rel_tol` (relative) of `ln K`.
pub fn loss_at_ln_k<T: Real>(loss: T, k: usize, rel_tol: T) -> bool {
    let ln_k = T::from_usize(k.max(1)).ln();
    (loss - ln_k).abs() <= rel_tol * ln_k
}
