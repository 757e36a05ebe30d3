//! The multi-crop cross-entropy of DINO / DINO-vMF and a reference composite that runs the whole
//! head-output chain (normalise, logits, teacher targets, loss, gradients, center update).
//!
//! Layouts are crop-major: student `z_s[n_crops * B, p]` (crop c, sample b at row `c * B + b`;
//! crops 0 and 1 are the global crops), teacher `z_t[2 * B, p]` (the two global crops), prototypes
//! `v[K, p]`, radii `g[K]`; student and teacher each have their own `(v, g)`.
//!
//! The loss is the mean over the `2 n_crops - 2` pairs (teacher view q in {0, 1}, student view
//! v != q) of the batch mean of `-sum_k P_t,q(k) log_softmax(l_s,v)(k)`. For one student row of
//! view v the pairs it enters only differ in the target, so the row needs just the sum of its
//! `n_q(v)` targets (1 for a global view, 2 for a local one): the gradient wrt its logits is
//! `(n_q softmax(l_s) - sum_q P_t,q) / (B * pairs)`.
use half::f16;

use crate::centering::{self, Centering};
use crate::collapse::{self, CollapseStats};
use crate::logits::{self, LogitKind, VmfReal, NORMALIZE_EPS};
use crate::ops::{l2norm_row_backward, l2norm_row_inplace};
use crate::real::Real;
use crate::vmf::BesselApprox;

/// Everything that selects the method and its constants (per step, the schedule may change
/// `teacher_temp`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossConfig {
    pub kind: LogitKind,
    pub centering: Centering,
    /// `g_k` fixed at 1 (DINO's stable setting); otherwise `g` is learned.
    pub norm_last_layer: bool,
    /// The f32 hot path's approximation of `D_p` (f64 always uses the exact reference).
    pub approx: BesselApprox,
    pub student_temp: f64,
    pub teacher_temp: f64,
    pub center_momentum: f64,
}

impl LossConfig {
    /// DINO: plain logits, logit centering, fixed radii.
    pub fn dino() -> Self {
        Self {
            kind: LogitKind::Dino,
            centering: Centering::Logit,
            norm_last_layer: true,
            approx: BesselApprox::default(),
            student_temp: 0.1,
            teacher_temp: 0.04,
            center_momentum: 0.9,
        }
    }

    /// DINO-vMF: vMF logits, probability centering, learned radii (kappa must be free to mean
    /// anything).
    pub fn vmf() -> Self {
        Self {
            kind: LogitKind::Vmf,
            centering: Centering::Probability,
            norm_last_layer: false,
            ..Self::dino()
        }
    }
}

/// Number of (teacher view, student view) pairs of the multi-crop loss.
#[inline]
pub fn n_pairs(n_crops: usize) -> usize {
    (2 * n_crops).saturating_sub(2)
}

/// How many teacher views (global crops other than itself) student view `v` is compared with.
#[inline]
pub fn n_teacher_views(v: usize) -> usize {
    if v < 2 {
        1
    } else {
        2
    }
}

/// Writes `out[k] = sum_{q in {0,1}, q != view} P_t,q(sample b)` from crop-major `p_t[2B, k]`;
/// returns the number of targets summed.
pub fn multicrop_target_sum<T: Real>(
    out: &mut [T],
    p_t: &[T],
    view: usize,
    b: usize,
    batch: usize,
    k: usize,
) -> usize {
    let out = &mut out[..k];
    out.fill(T::ZERO);
    let mut n = 0;
    for q in (0..2).filter(|&q| q != view) {
        let t = (q * batch + b) * k;
        for (o, &x) in out.iter_mut().zip(&p_t[t..t + k]) {
            *o += x;
        }
        n += 1;
    }
    n
}

/// One student row against the sum of its targets, in place: `l` holds the logits on entry and
/// `dL/dl = (n_targets softmax(l) - target_sum) * grad_scale` on exit. Returns
/// `sum_q CE(P_t,q, softmax(l))` (unscaled; `target_sum` sums to `n_targets`), computed as
/// `sum_k t_k (lse - l_k)` so that no two large numbers cancel.
pub fn xent_row_forward_backward_inplace<T: Real>(
    l: &mut [T],
    target_sum: &[T],
    n_targets: T,
    grad_scale: T,
) -> T {
    debug_assert!(target_sum.len() >= l.len());
    let lse = crate::ops::log_sum_exp(l);
    let mut loss = T::ZERO;
    for (x, &t) in l.iter_mut().zip(target_sum) {
        let nls = lse - *x;
        loss += t * nls;
        *x = (n_targets * (-nls).exp() - t) * grad_scale;
    }
    loss
}

/// [`xent_row_forward_backward_inplace`] into a separate `dl`.
pub fn xent_row_forward_backward<T: Real>(
    dl: &mut [T],
    l: &[T],
    target_sum: &[T],
    n_targets: T,
    grad_scale: T,
) -> T {
    let k = l.len();
    dl[..k].copy_from_slice(l);
    xent_row_forward_backward_inplace(&mut dl[..k], target_sum, n_targets, grad_scale)
}

/// Forward only of [`xent_row_forward_backward`].
pub fn xent_row_forward<T: Real>(l: &[T], target_sum: &[T]) -> T {
    let lse = crate::ops::log_sum_exp(l);
    let mut loss = T::ZERO;
    for (&x, &t) in l.iter().zip(target_sum) {
        loss += t * (lse - x);
    }
    loss
}

/// The multi-crop loss from materialised logits `l_s[n_crops * B, k]` and targets `p_t[2B, k]`
/// (what a GEMM backend has); writes `dl_s` and returns the loss. `row_buf[k]` is scratch.
#[allow(clippy::too_many_arguments)]
pub fn multicrop_xent_forward_backward<T: Real>(
    dl_s: &mut [T],
    l_s: &[T],
    p_t: &[T],
    row_buf: &mut [T],
    n_crops: usize,
    batch: usize,
    k: usize,
) -> T {
    let pairs = n_pairs(n_crops);
    let gs = T::ONE / T::from_usize((batch * pairs).max(1));
    let mut total = T::ZERO;
    for v in 0..n_crops {
        for b in 0..batch {
            let n = multicrop_target_sum(row_buf, p_t, v, b, batch, k);
            let r = (v * batch + b) * k..(v * batch + b + 1) * k;
            total += xent_row_forward_backward(
                &mut dl_s[r.clone()],
                &l_s[r],
                &row_buf[..k],
                T::from_usize(n),
                gs,
            );
        }
    }
    total * gs
}

/// Sizes of one loss call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LossDims {
    /// Crops per image, globals first (>= 2).
    pub n_crops: usize,
    /// Images per batch (B).
    pub batch: usize,
    /// Prototypes (K).
    pub k: usize,
    /// Head output dimension (p).
    pub p: usize,
}

/// Why a composite call was refused (nothing was written).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossError {
    /// `n_crops < 2`, or a zero batch, K or p.
    BadDims,
    /// A slice is shorter than the dims require (which one, by name).
    ShortSlice(&'static str),
}

/// Inputs of the composite, stored as `S` (f32, f64 or f16).
#[derive(Clone, Copy, Debug)]
pub struct LossInputs<'a, S> {
    /// Student head outputs `[n_crops * B, p]`, crop-major.
    pub z_s: &'a [S],
    /// Teacher head outputs `[2 * B, p]` (global crops).
    pub z_t: &'a [S],
    /// Student prototypes `[K, p]` and radii `[K]` (radii ignored with `norm_last_layer`).
    pub v_s: &'a [S],
    pub g_s: &'a [S],
    /// Teacher prototypes and radii (the EMA copy).
    pub v_t: &'a [S],
    pub g_t: &'a [S],
}

/// Gradient outputs of the composite (written, not accumulated).
#[derive(Debug)]
pub struct LossGrads<'a, S> {
    pub dz_s: &'a mut [S],
    pub dv_s: &'a mut [S],
    /// Zeroed with `norm_last_layer`.
    pub dg_s: &'a mut [S],
}

/// What one loss call reports.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LossOutput<T> {
    pub loss: T,
    /// Teacher entropies, max mean mass, mean KL (computed with the center the loss used).
    pub collapse: CollapseStats<T>,
    pub n_pairs: usize,
}

/// How the composite reads and writes its stored inputs and outputs: compute is always in `T`.
pub trait Stored<T: Real>: Copy {
    fn load(self) -> T;
    fn store(x: T) -> Self;
}

impl Stored<f32> for f32 {
    #[inline]
    fn load(self) -> f32 {
        self
    }
    #[inline]
    fn store(x: f32) -> f32 {
        x
    }
}

impl Stored<f64> for f64 {
    #[inline]
    fn load(self) -> f64 {
        self
    }
    #[inline]
    fn store(x: f64) -> f64 {
        x
    }
}

impl Stored<f32> for f16 {
    #[inline]
    fn load(self) -> f32 {
        self.to_f32()
    }
    #[inline]
    fn store(x: f32) -> f16 {
        f16::from_f32(x)
    }
}

/// Scratch elements (of the compute type) the composite needs:
/// `2 K p` (prototype directions, their gradient) `+ 2 B K` (teacher targets)
/// `+ (n_crops + 2) B (p + 1)` (unit features and norms) `+ 9 K + 2 p` (row buffers,
/// per-prototype terms). For the paper's B = 64, 10 crops, K = 65536, p = 256 that is about 42.9 M values.
pub fn scratch_len(dims: LossDims) -> usize {
    let LossDims {
        n_crops,
        batch,
        k,
        p,
    } = dims;
    2 * k * p + 2 * batch * k + (n_crops + 2) * batch * (p + 1) + 9 * k + 2 * p
}

fn eps<T: Real>() -> T {
    T::from_f64(NORMALIZE_EPS)
}

/// `x[n, p]` rows to unit length in place; `norm[n]` receives each row's original norm.
fn l2norm_rows_inplace<T: Real>(x: &mut [T], norm: &mut [T], n: usize, p: usize) {
    for (row, nr) in x.chunks_exact_mut(p).take(n).zip(norm.iter_mut()) {
        *nr = l2norm_row_inplace(row, eps::<T>());
    }
}

fn split<T>(s: &mut [T], n: usize) -> (&mut [T], &mut [T]) {
    s.split_at_mut(n)
}

fn load_into<S: Stored<T>, T: Real>(dst: &mut [T], src: &[S]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = s.load();
    }
}

/// The reference DINO / DINO-vMF loss with its gradients, on `T = f32` or `f64` storage.
///
/// Runs teacher targets (with the *previous* `center[K]`), the student logits and the multi-crop
/// loss row by row with naive loops on `scratch` (length [`scratch_len`], no allocation), writes
/// `dz_s`, `dv_s`, `dg_s`, and then updates `center` with this batch's statistic.
pub fn multicrop_loss_forward_backward<T: VmfReal + Stored<T>>(
    cfg: &LossConfig,
    dims: LossDims,
    inputs: LossInputs<'_, T>,
    grads: LossGrads<'_, T>,
    center: &mut [T],
    scratch: &mut [T],
) -> Result<LossOutput<T>, LossError> {
    multicrop_loss_forward_backward_stored(cfg, dims, inputs, grads, center, scratch)
}

/// [`multicrop_loss_forward_backward`] with f16 inputs and gradient outputs: values are widened
/// on load and everything (features, logits, `D_p`, softmax, loss, accumulations) is computed in
/// f32; the center stays f32 (probability centers of order 1/K sit below f16's normal range).
pub fn multicrop_loss_forward_backward_f16(
    cfg: &LossConfig,
    dims: LossDims,
    inputs: LossInputs<'_, f16>,
    grads: LossGrads<'_, f16>,
    center: &mut [f32],
    scratch: &mut [f32],
) -> Result<LossOutput<f32>, LossError> {
    multicrop_loss_forward_backward_stored(cfg, dims, inputs, grads, center, scratch)
}

fn check_dims<S>(
    dims: LossDims,
    cfg: &LossConfig,
    inputs: &LossInputs<'_, S>,
    grads: &LossGrads<'_, S>,
    center_len: usize,
    scratch_len_have: usize,
) -> Result<(), LossError> {
    let LossDims {
        n_crops,
        batch,
        k,
        p,
    } = dims;
    if n_crops < 2 || batch == 0 || k == 0 || p == 0 {
        return Err(LossError::BadDims);
    }
    let ns = n_crops * batch;
    let need = |have: usize, want: usize, name: &'static str| {
        if have < want {
            Err(LossError::ShortSlice(name))
        } else {
            Ok(())
        }
    };
    let gk = if cfg.norm_last_layer { 0 } else { k };
    need(inputs.z_s.len(), ns * p, "z_s")?;
    need(inputs.z_t.len(), 2 * batch * p, "z_t")?;
    need(inputs.v_s.len(), k * p, "v_s")?;
    need(inputs.v_t.len(), k * p, "v_t")?;
    need(inputs.g_s.len(), gk, "g_s")?;
    need(inputs.g_t.len(), gk, "g_t")?;
    need(grads.dz_s.len(), ns * p, "dz_s")?;
    need(grads.dv_s.len(), k * p, "dv_s")?;
    need(grads.dg_s.len(), gk, "dg_s")?;
    need(center_len, k, "center")?;
    need(scratch_len_have, scratch_len(dims), "scratch")
}

/// The composite, generic over how inputs/outputs are stored (`S`) and the compute type (`T`).
pub fn multicrop_loss_forward_backward_stored<S: Stored<T>, T: VmfReal>(
    cfg: &LossConfig,
    dims: LossDims,
    inputs: LossInputs<'_, S>,
    grads: LossGrads<'_, S>,
    center: &mut [T],
    scratch: &mut [T],
) -> Result<LossOutput<T>, LossError> {
    check_dims(dims, cfg, &inputs, &grads, center.len(), scratch.len())?;
    let LossDims {
        n_crops,
        batch,
        k,
        p,
    } = dims;
    let nt = 2 * batch;
    let ns = n_crops * batch;
    let pairs = n_pairs(n_crops);
    let tau_s = T::from_f64(cfg.student_temp);
    let tau_t = T::from_f64(cfg.teacher_temp);
    let norm_last = cfg.norm_last_layer;

    let (mu, rest) = split(scratch, k * p);
    let (dmu, rest) = split(rest, k * p);
    let (p_t, rest) = split(rest, nt * k);
    let (y_t, rest) = split(rest, nt * p);
    let (y_s, rest) = split(rest, ns * p);
    let (zn_t, rest) = split(rest, nt);
    let (zn_s, rest) = split(rest, ns);
    let (r, rest) = split(rest, k);
    let (vnorm, rest) = split(rest, k);
    let (scale, rest) = split(rest, k);
    let (bias, rest) = split(rest, k);
    let (dbias, rest) = split(rest, k);
    let (stat, rest) = split(rest, k);
    let (dots, rest) = split(rest, k);
    let (lrow, rest) = split(rest, k);
    let (dlrow, rest) = split(rest, k);
    let (drow, rest) = split(rest, p);
    let (dzrow, _) = split(rest, p);

    // Teacher: targets with the previous center, and the batch statistic for the update.
    load_into(mu, &inputs.v_t[..k * p]);
    l2norm_rows_inplace(mu, vnorm, k, p);
    if norm_last {
        r.fill(T::ONE);
    } else {
        load_into(r, &inputs.g_t[..k]);
    }
    logits::branch_terms_forward(scale, bias, dbias, r, tau_t, p, cfg.kind, cfg.approx);
    load_into(y_t, &inputs.z_t[..nt * p]);
    l2norm_rows_inplace(y_t, zn_t, nt, p);
    stat.fill(T::ZERO);
    let w_t = T::ONE / T::from_usize(nt);
    for j in 0..nt {
        logits::dots_row_forward(dots, &y_t[j * p..(j + 1) * p], mu, k, p);
        let pr = &mut p_t[j * k..(j + 1) * k];
        if cfg.centering.is_sinkhorn() {
            // The logits wait in `p_t` for the batch's balancing below.
            logits::logits_row_forward(pr, dots, scale, bias);
        } else {
            logits::logits_row_forward(lrow, dots, scale, bias);
            centering::teacher_targets_row(pr, stat, lrow, center, tau_t, cfg.centering, w_t);
        }
    }
    if let Centering::Sinkhorn { iters } = cfg.centering {
        // `dots` and `lrow` are free until the student's rows.
        crate::sinkhorn::sinkhorn_targets_inplace(p_t, dots, lrow, nt, k, iters);
        centering::add_row_mean(stat, p_t, nt, k);
    }

    // Student: logits row by row, loss, and the chain back to z, v, g.
    load_into(mu, &inputs.v_s[..k * p]);
    l2norm_rows_inplace(mu, vnorm, k, p);
    if norm_last {
        r.fill(T::ONE);
    } else {
        load_into(r, &inputs.g_s[..k]);
    }
    logits::branch_terms_forward(scale, bias, dbias, r, tau_s, p, cfg.kind, cfg.approx);
    load_into(y_s, &inputs.z_s[..ns * p]);
    l2norm_rows_inplace(y_s, zn_s, ns, p);
    dmu.fill(T::ZERO);
    // `r` is free from here on: it accumulates dL/dr.
    r.fill(T::ZERO);
    let gs = T::ONE / T::from_usize(batch * pairs);
    let mut total = T::ZERO;
    for v in 0..n_crops {
        for b in 0..batch {
            let i = v * batch + b;
            let yi = &y_s[i * p..(i + 1) * p];
            // Buffers: `dlrow` holds the target sum, then dL/d(dots); `lrow` the logits, then
            // dL/dl; `drow` dL/dy; `dzrow` dL/dz.
            let n = multicrop_target_sum(dlrow, p_t, v, b, batch, k);
            logits::dots_row_forward(dots, yi, mu, k, p);
            logits::logits_row_forward(lrow, dots, scale, bias);
            total += xent_row_forward_backward_inplace(lrow, dlrow, T::from_usize(n), gs);
            logits::logits_row_backward(
                dlrow,
                if norm_last { None } else { Some(&mut r[..]) },
                lrow,
                dots,
                scale,
                dbias,
                tau_s,
            );
            logits::dots_row_backward(drow, dmu, dlrow, yi, mu, k, p);
            l2norm_row_backward(dzrow, drow, yi, zn_s[i], eps::<T>());
            for (o, &x) in grads.dz_s[i * p..(i + 1) * p].iter_mut().zip(dzrow.iter()) {
                *o = S::store(x);
            }
        }
    }
    let loss = total * gs;

    // dv = d(mu)/d(v)^T dmu, in place in `dmu` one row at a time, then stored.
    for kk in 0..k {
        let m = &mu[kk * p..(kk + 1) * p];
        l2norm_row_backward(drow, &dmu[kk * p..(kk + 1) * p], m, vnorm[kk], eps::<T>());
        for (o, &x) in grads.dv_s[kk * p..(kk + 1) * p].iter_mut().zip(drow.iter()) {
            *o = S::store(x);
        }
    }
    if norm_last {
        for o in grads.dg_s.iter_mut().take(k) {
            *o = S::store(T::ZERO);
        }
    } else {
        for (o, &x) in grads.dg_s[..k].iter_mut().zip(r.iter()) {
            *o = S::store(x);
        }
    }

    // Diagnostics with the center this loss used; mean KL over pairs = loss - mean teacher row
    // entropy (every teacher row enters n_crops - 1 pairs, so the weights match the loss's).
    let mut stats = collapse::teacher_collapse_stats(p_t, nt, k, dots, T::ZERO);
    stats.mean_kl = loss - stats.mean_row_entropy;

    // Only now does the center move.
    centering::center_update(center, stat, T::from_f64(cfg.center_momentum));

    Ok(LossOutput {
        loss,
        collapse: stats,
        n_pairs: pairs,
    })
}
