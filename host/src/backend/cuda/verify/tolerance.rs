//! The tolerance of every kernel check, in one place: one entry per kernel output, shared by
//! the small cases (every element, `cargo test` and `verify-kernels`) and the production
//! shapes (sampled corners, `--large`). Where the rounding error grows with a size (the length
//! of a dot product, the number of rows a column sum adds), the entry is a function of that
//! size, so one formula covers both a 16-term product and a 25,216-row weight gradient.
//!
//! A check passes when `|got - want| <= atol + rtol |want|` for every element, against an f64
//! reference. f32 carries 24 bits (`eps = 2^-24 ~ 6e-8` relative per rounding); a sum of `n`
//! rounded terms of size ~1 drifts like `sqrt(n) eps` when the errors are independent, which
//! is what the `sqrt` terms below follow, with a margin of about 100x over that estimate so a
//! GPU's different (but correct) summation order passes and a wrong index does not.

/// `|got - want| <= atol + rtol |want|`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tol {
    pub rtol: f64,
    pub atol: f64,
}

impl Tol {
    pub const fn new(rtol: f64, atol: f64) -> Tol {
        Tol { rtol, atol }
    }
}

/// The kernel does the reference's own f32 operations in the same order (copies, gathers,
/// `a + b`, the optimiser's update written with core's per-element function): bit for bit.
pub const EXACT: Tol = Tol::new(0.0, 0.0);

/// `sqrt(n)` as f64.
fn root(n: usize) -> f64 {
    (n as f64).sqrt()
}

/// An f32 dot product of length `k` over values in (-1, 1) (every GEMM, the logits GEMM's
/// dots, the tensor-core GEMM's f32 accumulation of exactly representable bf16 products):
/// `max(1e-5, 2.5e-6 sqrt(k))`, i.e. 1e-5 up to k = 16 and 9.8e-5 at a 1536-wide MLP.
pub fn dot(k: usize) -> Tol {
    Tol::new(1e-5, (2.5e-6 * root(k)).max(1e-5))
}

/// A column sum over `n` rows of terms of size ~1 (LayerNorm's `dgamma` and `dbeta`, the
/// summed reductions, the bias gradient of iBOT's gathered rows):
/// `max(2e-5, 6.25e-6 sqrt(n))`, 1e-3 at the 25,216 tokens of a ViT-S/16 batch.
pub fn column_sum(n: usize) -> Tol {
    Tol::new(1e-4, (6.25e-6 * root(n)).max(2e-5))
}

/// GELU forward and backward (erf through core's f32 polynomial; ptxas may contract its
/// multiply-adds into FMAs, which the simulator does not: 1e-5 rather than a few ulps).
pub const GELU: Tol = Tol::new(1e-5, 1e-6);
/// The parameter gradients of the token embedding (sums over the batch).
pub const TOKENS_PARAMS: Tol = Tol::new(1e-6, 1e-6);
/// Bilinear resize of the position embedding, forward (4 weighted terms).
pub const POS_RESIZE_FORWARD: Tol = Tol::new(1e-6, 1e-6);
/// Its backward (scatter-adds of up to `(src / dst)^2` terms per element).
pub const POS_RESIZE_BACKWARD: Tol = Tol::new(1e-5, 1e-6);
/// LayerNorm forward: `y`, the row means and the reciprocal standard deviations.
pub const LAYERNORM_FORWARD: Tol = Tol::new(2e-5, 2e-6);
/// LayerNorm's input gradient (two row means of products per element).
pub const LAYERNORM_DX: Tol = Tol::new(1e-4, 2e-5);
/// A softmax row (probabilities in [0, 1]).
pub const SOFTMAX: Tol = Tol::new(1e-5, 1e-7);
/// The softmax backward `scale p (dp - <dp, p>)`.
pub const SOFTMAX_BACKWARD: Tol = Tol::new(1e-5, 1e-6);
/// L2 normalisation: the unit rows.
pub const L2NORM_ROWS: Tol = Tol::new(1e-5, 1e-7);
/// L2 normalisation: the norms (which may be ~1e-7 in the clamped case).
pub const L2NORM_NORMS: Tol = Tol::new(1e-5, 1e-12);
/// The L2 normalisation's backward.
pub const L2NORM_BACKWARD: Tol = Tol::new(1e-4, 1e-5);
/// The per-prototype logit terms (core's f32 function per prototype; the Bessel ratio's
/// series and `ln` make it not bit-identical across compilers).
pub const BRANCH_TERMS: Tol = Tol::new(1e-5, 1e-5);
/// Log-sum-exp values: the logits GEMM's per-tile states, `lse_combine`, the teacher's raw
/// LSE (magnitudes up to ~25, f32 `exp`/`ln`).
pub const LSE: Tol = Tol::new(1e-5, 1e-5);
/// The teacher's probabilities `exp(x - lse)`, as small as 1/K and below: a relative error of
/// f32 `exp` at |x| ~ 25, with an absolute floor far below 1/K = 1.5e-5 at K = 65536.
pub const PROBABILITIES: Tol = Tol::new(1e-4, 1e-12);
/// The teacher's center statistic, a mean over the teacher rows of `tau_t l` (logit
/// centering: terms of both signs that may cancel) or of `p`: relative, with a floor at
/// `1e-6` of the largest term `largest`.
pub fn teacher_stat(largest: f64) -> Tol {
    Tol::new(1e-4, 1e-6 * largest)
}
/// Row entropies of K-way distributions (sums of `p ln p` over up to 65536 columns).
pub const ROW_ENTROPY: Tol = Tol::new(1e-5, 1e-5);
/// The fused cross-entropy's gradient with respect to the dots, per element (iBOT's masked
/// rows and the [CLS] columns alike): `scale_j (q p - t) w g`, a difference of f32
/// probabilities (each at most 1, `q`, `t` at most 2) that may cancel to zero, so the absolute
/// floor follows `bound = max_j scale_j * g * max w`, the size of an entry whose probabilities
/// are 1: `1e-5 bound`, rtol 1e-4.
pub fn xent_ddots(bound: f64) -> Tol {
    Tol::new(1e-4, 1e-5 * bound)
}

/// The largest magnitude of `x`.
pub fn largest(x: &[f64]) -> f64 {
    x.iter().fold(0.0, |m, v| m.max(v.abs()))
}

/// A sum of `n` terms, the largest of size `largest`, accumulated in f32 (the fused
/// cross-entropy's `dr` columns and loss parts, summed over every row a block sees):
/// `max(1e-6, 2e-6 largest sqrt(n))`, about 30 times the random-walk estimate, rtol 1e-4.
pub fn sum_of(n: usize, largest: f64) -> Tol {
    Tol::new(1e-4, (2e-6 * largest * root(n)).max(1e-6))
}

/// A whole loss, the host's sum of the blocks' parts (a value of order 1 to 10).
pub const LOSS: Tol = Tol::new(1e-5, 1e-6);

/// Outputs that mix many terms of both signs (the loss chain's gradients, a logit center):
/// relative `rtol`, with an absolute floor at `frac` of the largest reference entry.
pub fn of_largest(rtol: f64, frac: f64, want: &[f64]) -> Tol {
    Tol::new(rtol, frac * largest(want) + 1e-30)
}

/// The loss chain's scalars: the loss, the teacher's entropies, the largest prototype mass.
pub const LOSS_SCALARS: Tol = Tol::new(2e-5, 1e-6);

/// Sinkhorn-Knopp: the logits `x / tau` into `ln Q`.
pub const SINKHORN_LOGITS: Tol = Tol::new(1e-6, 1e-6);
/// One column round (a log-sum-exp over the batch per prototype).
pub const SINKHORN_COLUMNS: Tol = Tol::new(1e-5, 1e-5);
/// One row round (a log-sum-exp over K per row), and the final rows' probabilities.
pub const SINKHORN_ROWS: Tol = Tol::new(1e-5, 1e-6);
/// The whole chain of `rounds` column and row rounds: each round's rounding is carried into
/// the next, and the targets are exponentials of the result (`1e-3` after 3 rounds).
pub fn sinkhorn_targets(rounds: usize) -> Tol {
    Tol::new(3e-4 * rounds as f64, 1e-6)
}

/// The partial sums of `reduce_segments` (chunks of 4096 values of size ~1): sums with an
/// absolute floor, sums of squares and largest magnitudes relative only.
pub const REDUCE_SUM: Tol = Tol::new(1e-5, 1e-4);
pub const REDUCE_RELATIVE: Tol = Tol::new(1e-5, 0.0);
/// The host-facing scalars of the gradient clip (`reduce_final`, `clip_coef`) and the
/// gradient scaled by a clip coefficient: a few f32 operations on one value, relative.
pub const CLIP_SCALARS: Tol = Tol::new(1e-6, 0.0);

/// The fused bf16 attention's output: P is rounded to bf16 (2^-8 relative) before `P V`,
/// over values of V below 1, so `2^-8 + 1e-5` absolute.
pub const BF16_ATTENTION_OUT: Tol = Tol::new(0.0, 1.0 / 256.0 + 1e-5);
/// Its per-row log-sum-exp (scores from bf16 q and k): `2^-8` absolute.
pub const BF16_ATTENTION_LSE: Tol = Tol::new(0.0, 1.0 / 256.0);
/// `delta = rowsum(dO * O)` of the backward, an f32 sum over the head's columns.
pub const ATTENTION_DELTA: Tol = Tol::new(1e-5, 1e-5);
/// dq, dk, dv of the fused bf16 backward (P and dS rounded to bf16): `2^-7` of the largest
/// reference entry.
pub fn bf16_attention_grad(want: &[f64]) -> Tol {
    of_largest(0.0, 1.0 / 128.0, want)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size-dependent entries reproduce the tolerances the small cases and the
    /// production shapes were first written with, at their sizes, and grow with the size.
    #[test]
    fn size_dependent_tolerances_cover_both_scales() {
        assert_eq!(dot(16).atol, 1e-5);
        assert!((dot(1536).atol - 2e-5 * (1536f64).sqrt() / 8.0).abs() < 1e-12);
        assert!((column_sum(25_216).atol - 1e-4 * (25_216f64).sqrt() / 16.0).abs() < 1e-12);
        // The floor below ~10 rows (the small cases' 2e-5), the sqrt above it.
        assert_eq!(column_sum(4).atol, 2e-5);
        assert!((column_sum(70).atol - 6.25e-6 * (70f64).sqrt()).abs() < 1e-15);
        for n in [1, 10, 100, 10_000, 1 << 20] {
            assert!(dot(4 * n).atol >= dot(n).atol);
            assert!(column_sum(4 * n).atol >= column_sum(n).atol);
            assert!(sum_of(4 * n, 1.0).atol >= sum_of(n, 1.0).atol);
        }
        assert_eq!(sum_of(100, 0.0).atol, 1e-6);
        assert_eq!(largest(&[1.0, -3.0, 2.0]), 3.0);
        assert!((sinkhorn_targets(3).rtol - 9e-4).abs() < 1e-15);
    }
}
