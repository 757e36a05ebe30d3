//! Teacher targets and the center that keeps the teacher from collapsing (no gradient here).
//!
//! Two ways to center (method.md, "switch centering = logit | probability"):
//! - **Logit**: `P_t = softmax(l_t - c / tau_t)`. The center is kept in the units of the *raw*
//!   teacher logits `tau_t * l_t` (for DINO that is `w_k . y`, as in DINO itself), so it does not
//!   jump when `tau_t` warms up. For vMF logits the raw logit `tau_t * l_t = w_k . y +
//!   tau_t D_p(kappa_k)` contains the normaliser, which the centering therefore cancels on the
//!   teacher; this is the behaviour the spec describes, and why vMF defaults to probability
//!   centering. Initialised to 0.
//! - **Probability**: `P~ = softmax(l_t)`, `P_t = softmax(l_t - ln c)` (that is `P~ / c`
//!   renormalised); the center tracks the batch mean of `P~`. Initialised to `1/K`.
//!
//! Either center moves as `c <- m c + (1 - m) batch_mean` *after* the loss: a batch is always
//! centered with the previous center.
//!
//! A third choice, **Sinkhorn** (method.md, "Anti-collapse tools"), balances the whole batch's
//! teacher logits instead (see [`crate::sinkhorn`]); it needs every row at once, so only the batch
//! function [`teacher_targets_forward`] runs it. Its "statistic" is the batch mean of the targets;
//! the center it updates is not read by it (kept so the state and checkpoints keep one layout).
use crate::ops::softmax::{softmax_row, softmax_shifted_row};
use crate::real::Real;

/// Where the teacher is centered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Centering {
    /// Subtract an EMA of the raw teacher logits (DINO).
    #[default]
    Logit,
    /// Divide by an EMA of the teacher probabilities (DINO-vMF).
    Probability,
    /// Sinkhorn-Knopp balancing of the batch's teacher logits, `iters` rounds (>= 1).
    Sinkhorn { iters: u32 },
}

impl Centering {
    /// The code a GPU kernel receives for this centering (decoded by [`Centering::from_code`]).
    pub const fn code(self) -> u32 {
        match self {
            Centering::Logit => 0,
            Centering::Probability => 1,
            Centering::Sinkhorn { .. } => 2,
        }
    }

    /// The per-row centering of a launch code: 1 probability, anything else logit (Sinkhorn, code
    /// 2, has kernels of its own and never reaches a per-row kernel).
    #[inline(always)]
    pub const fn from_code(code: u32) -> Centering {
        if code == 1 {
            Centering::Probability
        } else {
            Centering::Logit
        }
    }

    /// Whether the targets come from Sinkhorn-Knopp (whole-batch) rather than a center.
    pub const fn is_sinkhorn(self) -> bool {
        matches!(self, Centering::Sinkhorn { .. })
    }
}

/// The smallest center value used inside `ln c`: an f32 EMA of a probability that stays at zero
/// underflows after ~900 steps, and `ln 0` would turn the whole row into NaN. Clamping keeps the
/// (intended, large) boost of a long-unused prototype finite.
pub const CENTER_FLOOR: f64 = 1e-30;

/// Initial center: 0 for logit centering, `1/K` for probability centering.
pub fn center_init<T: Real>(center: &mut [T], centering: Centering) {
    let v = match centering {
        Centering::Logit => T::ZERO,
        Centering::Probability | Centering::Sinkhorn { .. } => {
            T::ONE / T::from_usize(center.len().max(1))
        }
    };
    center.fill(v);
}

/// The teacher's centering shift of prototype `i`, `P_t = softmax(l - shift)`: `c_i / tau_t`
/// (as `c_i * inv_tau`) for logit centering, `ln max(c_i, CENTER_FLOOR)` for probability
/// centering (0 for Sinkhorn, whose balancing is not a per-row shift). The GPU kernels call this
/// per element.
#[inline(always)]
pub fn teacher_shift<T: Real>(c: T, inv_tau: T, centering: Centering) -> T {
    match centering {
        Centering::Logit => c * inv_tau,
        Centering::Probability => c.max(T::from_f64(CENTER_FLOOR)).ln(),
        Centering::Sinkhorn { .. } => T::ZERO,
    }
}

/// One teacher row: writes the target `p_t = P_t` and adds `weight *` this row's centering
/// statistic (`tau_t l` or `softmax(l)`) into `stat` (with `weight = 1 / rows` it builds the batch
/// mean the center update needs). `center` is the previous center. With Sinkhorn centering a
/// single row cannot be balanced: this writes the row's plain softmax (the input of the batch's
/// Sinkhorn rounds) and adds it to `stat`; use [`teacher_targets_forward`] for the targets.
pub fn teacher_targets_row<T: Real>(
    p_t: &mut [T],
    stat: &mut [T],
    l: &[T],
    center: &[T],
    tau_t: T,
    centering: Centering,
    weight: T,
) {
    let k = l.len();
    debug_assert!(p_t.len() >= k && stat.len() >= k && center.len() >= k);
    let (p_t, stat, center) = (&mut p_t[..k], &mut stat[..k], &center[..k]);
    match centering {
        Centering::Logit => {
            for (s, &x) in stat.iter_mut().zip(l) {
                *s += weight * (tau_t * x);
            }
            let inv_tau = T::ONE / tau_t;
            softmax_shifted_row(p_t, l, |i| teacher_shift(center[i], inv_tau, centering));
        }
        Centering::Probability => {
            softmax_row(p_t, l);
            for (s, &x) in stat.iter_mut().zip(p_t.iter()) {
                *s += weight * x;
            }
            softmax_shifted_row(p_t, l, |i| teacher_shift(center[i], T::ZERO, centering));
        }
        Centering::Sinkhorn { .. } => {
            softmax_row(p_t, l);
            for (s, &x) in stat.iter_mut().zip(p_t.iter()) {
                *s += weight * x;
            }
        }
    }
}

/// Teacher targets for a whole batch `l_t[n, k]`: writes `p_t[n, k]` and `batch_stat[k]` (the
/// batch mean the center update uses). With Sinkhorn centering `batch_stat` is the batch mean
/// of the balanced targets, and `col_scratch[2k]` is its scratch (unused otherwise; may be
/// empty then).
#[allow(clippy::too_many_arguments)]
pub fn teacher_targets_forward<T: Real>(
    p_t: &mut [T],
    batch_stat: &mut [T],
    l_t: &[T],
    center: &[T],
    tau_t: T,
    centering: Centering,
    col_scratch: &mut [T],
    n: usize,
    k: usize,
) {
    batch_stat[..k].fill(T::ZERO);
    let w = T::ONE / T::from_usize(n.max(1));
    if let Centering::Sinkhorn { iters } = centering {
        let (col_max, col_sum) = col_scratch[..2 * k].split_at_mut(k);
        crate::sinkhorn::sinkhorn_targets_forward(p_t, l_t, col_max, col_sum, n, k, iters);
        add_row_mean(batch_stat, p_t, n, k);
        return;
    }
    for (pr, lr) in p_t.chunks_exact_mut(k).zip(l_t.chunks_exact(k)).take(n) {
        teacher_targets_row(pr, batch_stat, lr, center, tau_t, centering, w);
    }
}

/// `stat[k] += mean over the n rows of rows[n, k]`.
pub fn add_row_mean<T: Real>(stat: &mut [T], rows: &[T], n: usize, k: usize) {
    let w = T::ONE / T::from_usize(n.max(1));
    for row in rows.chunks_exact(k).take(n) {
        for (s, &x) in stat[..k].iter_mut().zip(row) {
            *s += w * x;
        }
    }
}

/// `c <- m c + (1 - m) batch_stat`; call it after the loss of the batch that produced `batch_stat`.
pub fn center_update<T: Real>(center: &mut [T], batch_stat: &[T], momentum: T) {
    let one_m = T::ONE - momentum;
    for (c, &s) in center.iter_mut().zip(batch_stat) {
        *c = momentum * *c + one_m * s;
    }
}
