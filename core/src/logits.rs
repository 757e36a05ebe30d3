//! Prototype logits of DINO and DINO-vMF, as a chain of small pure stages.
//!
//! The head output z is L2-normalised to y; the prototypes are weight-normalised,
//! w_k = r_k mu_k with mu_k = v_k / ||v_k|| and r_k = g_k (or 1 with `norm_last_layer`).
//! Every logit is then `scale_k * (mu_k . y) + bias_k`:
//! - DINO: `scale_k = r_k / tau`, `bias_k = 0`;
//! - vMF:  `kappa_k = |r_k| / tau`, `scale_k = r_k / tau`, `bias_k = D_p(kappa_k)`.
//!
//! Splitting it this way lets a backend compute `dots = Y M^T` with a GEMM and finish each row in
//! one fused pass; the naive loops here are the reference those backends are checked against.
//!
//! Gradient conventions (llm.c style): row-side outputs (dy, dz, ddots) are written, parameter-side
//! outputs that collect contributions from many rows (dmu, dr) are accumulated with `+=`.
use crate::ops::{l2norm_backward, l2norm_forward};
use crate::real::Real;
use crate::vmf::{self, BesselApprox};

/// Which logit the head produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LogitKind {
    /// `l_k = w_k . y / tau`: the component normalisers are dropped.
    #[default]
    Dino,
    /// `l_k = kappa_k mu_k . y + D_p(kappa_k)`: a uniform vMF mixture posterior.
    Vmf,
}

impl LogitKind {
    /// The code a GPU kernel receives for this kind (decoded by [`LogitKind::from_code`]).
    pub const fn code(self) -> u32 {
        match self {
            LogitKind::Dino => 0,
            LogitKind::Vmf => 1,
        }
    }

    /// The kind of a launch code: 1 vMF, anything else DINO.
    #[inline(always)]
    pub const fn from_code(code: u32) -> LogitKind {
        if code == 1 {
            LogitKind::Vmf
        } else {
            LogitKind::Dino
        }
    }
}

/// Lower bound on a norm before dividing by it, as in `torch.nn.functional.normalize`.
pub const NORMALIZE_EPS: f64 = crate::ops::L2NORM_EPS;

/// The shifted vMF log-normaliser and its derivative at the precision of `Self`.
///
/// f64 goes to the exact reference (finite-difference checks need consistent derivatives), f32 to
/// the fast hot-path approximation chosen by `approx`; f64 ignores `approx`.
pub trait VmfReal: Real {
    /// `D_p(kappa)`.
    fn log_norm_shifted(p: usize, kappa: Self, approx: BesselApprox) -> Self;
    /// `A_p(kappa) = -d D_p / d kappa`.
    fn mean_resultant(p: usize, kappa: Self, approx: BesselApprox) -> Self;
}

impl VmfReal for f32 {
    #[inline]
    fn log_norm_shifted(p: usize, kappa: f32, approx: BesselApprox) -> f32 {
        vmf::log_norm_shifted(p, kappa, approx)
    }
    #[inline]
    fn mean_resultant(p: usize, kappa: f32, approx: BesselApprox) -> f32 {
        vmf::mean_resultant(p, kappa, approx)
    }
}

impl VmfReal for f64 {
    #[inline]
    fn log_norm_shifted(p: usize, kappa: f64, _approx: BesselApprox) -> f64 {
        vmf::reference::log_norm_shifted(p, kappa)
    }
    #[inline]
    fn mean_resultant(p: usize, kappa: f64, _approx: BesselApprox) -> f64 {
        vmf::reference::mean_resultant(p, kappa)
    }
}

pub use crate::ops::dot::{axpy, dot};

/// Weight normalisation of the last layer: `mu[k, p]` unit directions, `vnorm[k] = ||v_k||`,
/// `r[k] = g_k`, or 1 when `g` is `None` (`norm_last_layer`).
pub fn weight_norm_forward<T: Real>(
    mu: &mut [T],
    r: &mut [T],
    vnorm: &mut [T],
    v: &[T],
    g: Option<&[T]>,
    k: usize,
    p: usize,
) {
    l2norm_forward(mu, vnorm, v, k, p, T::from_f64(NORMALIZE_EPS));
    match g {
        Some(g) => r[..k].copy_from_slice(&g[..k]),
        None => r[..k].fill(T::ONE),
    }
}

/// Backward of [`weight_norm_forward`]: writes `dv[k, p]` from `dmu`, and `dg = dr` when `dg` is
/// given (`None` = `norm_last_layer`, the radius is not a parameter).
#[allow(clippy::too_many_arguments)]
pub fn weight_norm_backward<T: Real>(
    dv: &mut [T],
    dg: Option<&mut [T]>,
    dmu: &[T],
    dr: &[T],
    mu: &[T],
    vnorm: &[T],
    k: usize,
    p: usize,
) {
    l2norm_backward(dv, dmu, mu, vnorm, k, p, T::from_f64(NORMALIZE_EPS));
    if let Some(dg) = dg {
        dg[..k].copy_from_slice(&dr[..k]);
    }
}

/// Per-prototype terms of one branch (student or teacher, each with its own `tau`).
///
/// Writes `scale[k]`, `bias[k]` and `dbias_dr[k] = d bias_k / d r_k` (so that the backward is the
/// same fused pass for both kinds). For vMF, `kappa_k = |r_k| / tau` because `||w_k|| = |g_k|`;
/// a negative `g_k` flips the mean direction, which `scale_k = r_k / tau` carries.
#[allow(clippy::too_many_arguments)]
pub fn branch_terms_forward<T: VmfReal>(
    scale: &mut [T],
    bias: &mut [T],
    dbias_dr: &mut [T],
    r: &[T],
    tau: T,
    p: usize,
    kind: LogitKind,
    approx: BesselApprox,
) {
    let k = r.len();
    debug_assert!(scale.len() >= k && bias.len() >= k && dbias_dr.len() >= k);
    let inv_tau = T::ONE / tau;
    for i in 0..k {
        scale[i] = r[i] * inv_tau;
        match kind {
            LogitKind::Dino => {
                bias[i] = T::ZERO;
                dbias_dr[i] = T::ZERO;
            }
            LogitKind::Vmf => {
                let kappa = r[i].abs() * inv_tau;
                let sign = if r[i] < T::ZERO { -T::ONE } else { T::ONE };
                bias[i] = T::log_norm_shifted(p, kappa, approx);
                dbias_dr[i] = -T::mean_resultant(p, kappa, approx) * sign * inv_tau;
            }
        }
    }
}

/// `dots[k] = mu[k, p] . y[p]` for one feature row (the GEMM `Y M^T`, one row).
pub fn dots_row_forward<T: Real>(dots: &mut [T], y: &[T], mu: &[T], k: usize, p: usize) {
    debug_assert!(dots.len() >= k && y.len() >= p && mu.len() >= k * p);
    for (d, m) in dots[..k].iter_mut().zip(mu.chunks_exact(p)) {
        *d = dot(m, &y[..p]);
    }
}

/// Backward of [`dots_row_forward`]: writes `dy[p] = sum_k ddots_k mu_k` and accumulates
/// `dmu[k, p] += ddots_k y`.
#[allow(clippy::too_many_arguments)]
pub fn dots_row_backward<T: Real>(
    dy: &mut [T],
    dmu: &mut [T],
    ddots: &[T],
    y: &[T],
    mu: &[T],
    k: usize,
    p: usize,
) {
    debug_assert!(dy.len() >= p && dmu.len() >= k * p && ddots.len() >= k && mu.len() >= k * p);
    let dy = &mut dy[..p];
    let y = &y[..p];
    dy.fill(T::ZERO);
    for ((&g, m), dm) in ddots[..k]
        .iter()
        .zip(mu.chunks_exact(p))
        .zip(dmu.chunks_exact_mut(p))
    {
        if g != T::ZERO {
            axpy(dy, g, m);
            axpy(dm, g, y);
        }
    }
}

/// One row of logits from its dots: `l_k = scale_k dots_k + bias_k`.
pub fn logits_row_forward<T: Real>(l: &mut [T], dots: &[T], scale: &[T], bias: &[T]) {
    for (((o, &d), &s), &b) in l.iter_mut().zip(dots).zip(scale).zip(bias) {
        *o = s * d + b;
    }
}

/// Backward of [`logits_row_forward`]: writes `ddots_k = dl_k scale_k` and, when `dr` is given,
/// accumulates `dr_k += dl_k (dots_k / tau + dbias_dr_k)` (for vMF that is
/// `dl_k (mu_k . y - sign(r_k) A_p(kappa_k)) / tau`).
pub fn logits_row_backward<T: Real>(
    ddots: &mut [T],
    dr: Option<&mut [T]>,
    dl: &[T],
    dots: &[T],
    scale: &[T],
    dbias_dr: &[T],
    tau: T,
) {
    let k = dl.len();
    debug_assert!(ddots.len() >= k && dots.len() >= k && scale.len() >= k && dbias_dr.len() >= k);
    if let Some(dr) = dr {
        let inv_tau = T::ONE / tau;
        for i in 0..k {
            dr[i] += dl[i] * (dots[i] * inv_tau + dbias_dr[i]);
        }
    }
    for i in 0..k {
        ddots[i] = dl[i] * scale[i];
    }
}

/// Whole-matrix [`logits_row_forward`] for `dots[n, k]`.
pub fn logits_forward<T: Real>(
    l: &mut [T],
    dots: &[T],
    scale: &[T],
    bias: &[T],
    n: usize,
    k: usize,
) {
    for (lr, dr) in l.chunks_exact_mut(k).zip(dots.chunks_exact(k)).take(n) {
        logits_row_forward(lr, dr, scale, bias);
    }
}

/// Whole-matrix [`logits_row_backward`]: writes `ddots[n, k]`, accumulates `dr[k]`.
#[allow(clippy::too_many_arguments)]
pub fn logits_backward<T: Real>(
    ddots: &mut [T],
    mut dr: Option<&mut [T]>,
    dl: &[T],
    dots: &[T],
    scale: &[T],
    dbias_dr: &[T],
    tau: T,
    n: usize,
    k: usize,
) {
    for i in 0..n {
        let rg = i * k..(i + 1) * k;
        logits_row_backward(
            &mut ddots[rg.clone()],
            dr.as_deref_mut(),
            &dl[rg.clone()],
            &dots[rg],
            scale,
            dbias_dr,
            tau,
        );
    }
}
