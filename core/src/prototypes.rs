//! Prototype diagnostics and the KoLeo-proto regulariser (method.md, Evaluation).
//!
//! The prototypes are the weight-normalised last layer, `w_k = g_k mu_k` with unit directions
//! `mu_k = v_k / ||v_k||`. Everything here reads the directions `mu[k, p]` (see
//! [`crate::logits::weight_norm_forward`]) or the gains, never allocates, and takes its scratch
//! from the caller.
//!
//! - Utilisation: how many prototypes win the argmax of at least one image over a data pass,
//!   and the entropy of the marginal assignment (ln K when every prototype wins equally often).
//! - kappa = |g_k| / tau: min, quartiles, max.
//! - Unique prototypes (partial prototype collapse): prototypes are scanned in order and one
//!   counts unless an earlier one lies within the angular distance `eps` (0.025 rad by default),
//!   so a group of near-copies counts once: K prototypes made of K/2 distinct directions, each
//!   twice, count K/2. (Counting only prototypes far from *every* other would count 0 there and
//!   say nothing about how many distinct directions survive.)
//! - KoLeo-proto: `L = -(1/K) sum_k ln(min_{j != k} ||mu_k - mu_j|| + KOLEO_EPS)`, a push apart
//!   of each prototype from its nearest neighbour, differentiated through the normalisation.
use crate::real::Real;

/// The angular threshold (radians) below which two prototypes count as one.
pub const UNIQUE_EPS: f64 = 0.025;
/// Added to the nearest-neighbour distance inside the log (two identical prototypes would give
/// ln 0).
pub const KOLEO_EPS: f64 = 1e-8;

/// Chord length `||a - b||` between unit vectors at angle `theta`: the angle test is done on
/// chords, which stay accurate for nearly equal vectors where `acos(a . b)` does not.
pub fn chord_of_angle(theta: f64) -> f64 {
    2.0 * libm::sin(0.5 * theta)
}

/// Squared Euclidean distance of two rows.
#[inline]
fn dist2<T: Real>(a: &[T], b: &[T]) -> T {
    let mut s = T::ZERO;
    for (&x, &y) in a.iter().zip(b) {
        let d = x - y;
        s += d * d;
    }
    s
}

/// Number of distinct prototype directions among the unit rows `mu[k, p]`: prototype `i`
/// counts unless some `j < i` lies within the angle `eps` (radians). O(K^2 p).
pub fn unique_prototypes<T: Real>(mu: &[T], k: usize, p: usize, eps: f64) -> usize {
    debug_assert!(mu.len() >= k * p);
    let c = chord_of_angle(eps);
    let c2 = T::from_f64(c * c);
    (0..k)
        .filter(|&i| {
            let a = &mu[i * p..(i + 1) * p];
            (0..i).all(|j| dist2(a, &mu[j * p..(j + 1) * p]) > c2)
        })
        .count()
}

/// The index of each row's nearest other row (largest `mu_i . mu_j`, i.e. smallest distance,
/// ties to the lower index) of the unit rows `mu[k, p]`, into `nn[k]`. O(K^2 p): the reference
/// the host's GEMM search is checked against. Needs `k >= 2`.
pub fn nearest_neighbours<T: Real>(mu: &[T], k: usize, p: usize, nn: &mut [usize]) {
    debug_assert!(k >= 2 && nn.len() >= k);
    for i in 0..k {
        let a = &mu[i * p..(i + 1) * p];
        let mut best = usize::MAX;
        let mut bd = T::ZERO;
        for j in (0..k).filter(|&j| j != i) {
            let d = dist2(a, &mu[j * p..(j + 1) * p]);
            if best == usize::MAX || d < bd {
                best = j;
                bd = d;
            }
        }
        nn[i] = best;
    }
}

/// Where [`koleo_proto`] puts its gradient: `||v_k||` of the weights, the gradient buffer it
/// accumulates `weight * dL/dv` into (`[k, p]`), and `[k, p]` scratch.
pub struct KoleoGrad<'a, T> {
    pub vnorm: &'a [T],
    pub dv: &'a mut [T],
    pub dmu: &'a mut [T],
    pub weight: T,
}

/// KoLeo-proto loss of the unit directions `mu[k, p]` given each row's nearest neighbour
/// `nn[k]`; with `grad` also ACCUMULATES `weight * dL/dv` into `dv[k, p]`,
/// the gradient with respect to the unnormalised weights `v` (`mu = v / vnorm`).
///
/// Each term `-(1/K) ln(d_i + eps)`, `d_i = ||mu_i - mu_n||`, moves both ends of its pair:
/// `dL/dmu_i = -(1/K) (mu_i - mu_n) / (d_i (d_i + eps))`, and the opposite for `mu_n`; then
/// `dL/dv = (I - mu mu^T) dL/dmu / ||v||`. `dmu` is scratch `[k, p]`.
pub fn koleo_proto<T: Real>(
    mu: &[T],
    nn: &[usize],
    k: usize,
    p: usize,
    grad: Option<KoleoGrad<'_, T>>,
) -> T {
    debug_assert!(mu.len() >= k * p && nn.len() >= k);
    let eps = T::from_f64(KOLEO_EPS);
    let inv_k = T::ONE / T::from_usize(k);
    let mut loss = T::ZERO;
    for i in 0..k {
        loss -= (dist2(&mu[i * p..(i + 1) * p], &mu[nn[i] * p..(nn[i] + 1) * p]).sqrt() + eps).ln();
    }
    let Some(KoleoGrad {
        vnorm,
        dv,
        dmu,
        weight,
    }) = grad
    else {
        return loss * inv_k;
    };
    debug_assert!(vnorm.len() >= k && dv.len() >= k * p && dmu.len() >= k * p);
    dmu[..k * p].fill(T::ZERO);
    for i in 0..k {
        let n = nn[i];
        let d = dist2(&mu[i * p..(i + 1) * p], &mu[n * p..(n + 1) * p]).sqrt();
        if d <= T::ZERO {
            // Identical directions: no direction to push along (the loss is at its cap).
            continue;
        }
        let c = inv_k / (d * (d + eps));
        for q in 0..p {
            let diff = mu[i * p + q] - mu[n * p + q];
            dmu[i * p + q] -= c * diff;
            dmu[n * p + q] += c * diff;
        }
    }
    for i in 0..k {
        let m = &mu[i * p..(i + 1) * p];
        let g = &dmu[i * p..(i + 1) * p];
        let mut proj = T::ZERO;
        for (&a, &b) in m.iter().zip(g) {
            proj += a * b;
        }
        let s = weight / vnorm[i];
        for q in 0..p {
            dv[i * p + q] += s * (g[q] - proj * m[q]);
        }
    }
    loss * inv_k
}

/// Quantiles `(min, q1, median, q3, max)` of `x` (linear interpolation between order
/// statistics, numpy's default); `x` is sorted in place. `None` for an empty slice or NaN.
pub fn quartiles<T: Real>(x: &mut [T]) -> Option<[T; 5]> {
    if x.is_empty() || x.iter().any(|v| v.is_nan()) {
        return None;
    }
    x.sort_unstable_by(|a, b| a.partial_cmp(b).unwrap_or(core::cmp::Ordering::Equal));
    let n = x.len();
    let at = |q: f64| {
        let pos = q * (n - 1) as f64;
        let lo = libm::floor(pos) as usize;
        let hi = if lo + 1 < n { lo + 1 } else { n - 1 };
        let f = T::from_f64(pos - lo as f64);
        x[lo] + f * (x[hi] - x[lo])
    };
    Some([x[0], at(0.25), at(0.5), at(0.75), x[n - 1]])
}

/// `kappa_k = |g_k| / tau` into `out[k]` (`g = None`: `norm_last_layer`, every gain 1).
pub fn kappas<T: Real>(g: Option<&[T]>, tau: T, out: &mut [T]) {
    match g {
        Some(g) => {
            for (o, &x) in out.iter_mut().zip(g) {
                *o = x.abs() / tau;
            }
        }
        None => out.fill(T::ONE / tau),
    }
}

/// Utilisation of a data pass from per-prototype argmax win counts.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Utilisation {
    /// Prototypes that won at least one argmax.
    pub used: usize,
    /// Entropy (nats) of the marginal assignment `counts / total`: ln K when uniform.
    pub entropy: f64,
    /// Images assigned.
    pub total: u64,
}

/// Utilisation from argmax win counts.
pub fn utilisation(counts: &[u64]) -> Utilisation {
    let total: u64 = counts.iter().sum();
    let mut h = 0.0f64;
    if total > 0 {
        let t = total as f64;
        for &c in counts.iter().filter(|&&c| c > 0) {
            let q = c as f64 / t;
            h -= q * libm::log(q);
        }
    }
    Utilisation {
        used: counts.iter().filter(|&&c| c > 0).count(),
        entropy: h,
        total,
    }
}

/// Index of the largest entry (ties to the lower index; NaN never wins).
pub fn argmax<T: Real>(x: &[T]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] || x[best].is_nan() {
            best = i;
        }
    }
    best
}
