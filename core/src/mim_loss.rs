//! iBOT's patch-level self-distillation loss (L_mim) and its reference composite.
//!
//! method.md, iBOT: for each global view, the cross-entropy between the teacher's patch
//! distribution (the teacher saw the crop unmasked) and the student's at the same position (the
//! student saw it masked), summed over the masked positions of the image and divided by
//! `max(1, count)`, then averaged over images and views (images without a mask count, with 0).
//! The patch targets have their own center, updated after the loss with the mean over patches
//! then over the batch of the teacher statistic (every image has the same number of patches, so
//! that is the mean over all teacher patch rows). Logits (DINO or vMF), centering (logit or
//! probability), temperatures and momentum come from a [`LossConfig`]: the caller passes the
//! patch teacher temperature and the patch center momentum in it.
//!
//! Layouts: view-major rows `(v, b, j)` at `(v * batch + b) * n + j` for student and teacher
//! patch features `[views * batch * n, p]` and the 0/1 mask `[views * batch * n]`.
use crate::centering::{add_row_mean, center_update, teacher_targets_row, Centering};
use crate::collapse::entropy;
use crate::logits::{self, VmfReal, NORMALIZE_EPS};
use crate::loss::{xent_row_forward_backward_inplace, LossConfig, LossError};
use crate::ops::{l2norm_row_backward, l2norm_row_inplace};

/// Sizes of one patch-loss call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MimDims {
    /// Global views (2).
    pub views: usize,
    pub batch: usize,
    /// Patch tokens per image.
    pub n: usize,
    /// Prototypes K and their dimension p.
    pub k: usize,
    pub p: usize,
}

impl MimDims {
    pub const fn rows(&self) -> usize {
        self.views * self.batch * self.n
    }
}

/// Inputs of the composite.
#[derive(Clone, Copy, Debug)]
pub struct MimInputs<'a, T> {
    /// Student patch head outputs (masked crops) and teacher patch head outputs (unmasked),
    /// `[views * batch * n, p]` each.
    pub z_s: &'a [T],
    pub z_t: &'a [T],
    /// 1 where the student's patch was masked, 0 elsewhere, `[views * batch * n]`.
    pub mask: &'a [T],
    /// The patch prototype layers (shared with `[CLS]` or separate) of student and teacher.
    pub v_s: &'a [T],
    pub g_s: &'a [T],
    pub v_t: &'a [T],
    pub g_t: &'a [T],
}

/// Gradients: `dz_s` is written (0 at unmasked rows); `dv_s`, `dg_s` ACCUMULATE (a shared head
/// adds the `[CLS]` loss's share to the same buffers; `dg_s` untouched with `norm_last_layer`).
#[derive(Debug)]
pub struct MimGrads<'a, T> {
    pub dz_s: &'a mut [T],
    pub dv_s: &'a mut [T],
    pub dg_s: &'a mut [T],
}

/// What one call reports.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct MimOutput<T> {
    /// L_mim (unweighted).
    pub loss: T,
    /// Mean entropy of the teacher's patch targets (ln K = uniform).
    pub teacher_entropy: T,
    /// Masked patches in the batch.
    pub masked: usize,
}

/// The weight of one masked row of an image with `count` masked patches: `1 / (views * batch *
/// max(1, count))`. Loss and gradient of the row are both scaled by it.
#[inline]
pub fn mim_row_weight(count: usize, views: usize, batch: usize) -> f64 {
    1.0 / ((views * batch) as f64 * count.max(1) as f64)
}

/// Masked rows of image `img` (`mask[img * n..(img + 1) * n]`).
#[inline]
pub fn masked_count<T: crate::Real>(mask: &[T], img: usize, n: usize) -> usize {
    mask[img * n..(img + 1) * n]
        .iter()
        .filter(|&&m| m != T::ZERO)
        .count()
}

/// Scratch elements the composite needs: `3 K p + 12 K + 3 p + rows K` (the last part holds
/// the whole batch's targets, which Sinkhorn-Knopp balancing needs before any row's loss).
pub fn mim_scratch_len(dims: MimDims) -> usize {
    3 * dims.k * dims.p + 12 * dims.k + 3 * dims.p + dims.rows() * dims.k
}

fn check<T>(
    cfg: &LossConfig,
    dims: MimDims,
    inp: &MimInputs<'_, T>,
    gr: &MimGrads<'_, T>,
    center: usize,
    scratch: usize,
) -> Result<(), LossError> {
    let MimDims {
        views,
        batch,
        n,
        k,
        p,
    } = dims;
    if views == 0 || batch == 0 || n == 0 || k == 0 || p == 0 {
        return Err(LossError::BadDims);
    }
    let r = dims.rows();
    let gk = if cfg.norm_last_layer { 0 } else { k };
    let need = |have: usize, want: usize, name: &'static str| {
        if have < want {
            Err(LossError::ShortSlice(name))
        } else {
            Ok(())
        }
    };
    need(inp.z_s.len(), r * p, "z_s")?;
    need(inp.z_t.len(), r * p, "z_t")?;
    need(inp.mask.len(), r, "mask")?;
    need(inp.v_s.len(), k * p, "v_s")?;
    need(inp.v_t.len(), k * p, "v_t")?;
    need(inp.g_s.len(), gk, "g_s")?;
    need(inp.g_t.len(), gk, "g_t")?;
    need(gr.dz_s.len(), r * p, "dz_s")?;
    need(gr.dv_s.len(), k * p, "dv_s")?;
    need(gr.dg_s.len(), gk, "dg_s")?;
    need(center, k, "center")?;
    need(scratch, mim_scratch_len(dims), "scratch")
}

/// The reference L_mim with its gradients, row by row on `scratch` (length
/// [`mim_scratch_len`], no allocation). Teacher targets use the previous `center[K]`; the
/// center moves after the loss.
pub fn mim_loss_forward_backward<T: VmfReal>(
    cfg: &LossConfig,
    dims: MimDims,
    inp: MimInputs<'_, T>,
    gr: MimGrads<'_, T>,
    center: &mut [T],
    scratch: &mut [T],
) -> Result<MimOutput<T>, LossError> {
    check(cfg, dims, &inp, &gr, center.len(), scratch.len())?;
    let MimDims {
        views,
        batch,
        n,
        k,
        p,
    } = dims;
    let rows = dims.rows();
    let norm_last = cfg.norm_last_layer;
    let tau_s = T::from_f64(cfg.student_temp);
    let tau_t = T::from_f64(cfg.teacher_temp);
    let eps = T::from_f64(NORMALIZE_EPS);

    let (mu_t, rest) = scratch.split_at_mut(k * p);
    let (mu_s, rest) = rest.split_at_mut(k * p);
    let (dmu, rest) = rest.split_at_mut(k * p);
    let (vn_t, rest) = rest.split_at_mut(k);
    let (vn_s, rest) = rest.split_at_mut(k);
    let (r, rest) = rest.split_at_mut(k);
    let (scale_t, rest) = rest.split_at_mut(k);
    let (bias_t, rest) = rest.split_at_mut(k);
    let (dbias_t, rest) = rest.split_at_mut(k);
    let (scale_s, rest) = rest.split_at_mut(k);
    let (bias_s, rest) = rest.split_at_mut(k);
    let (dbias_s, rest) = rest.split_at_mut(k);
    let (stat, rest) = rest.split_at_mut(k);
    let (dots, rest) = rest.split_at_mut(k);
    let (lrow, rest) = rest.split_at_mut(k);
    let (yrow, rest) = rest.split_at_mut(p);
    let (dyrow, rest) = rest.split_at_mut(p);
    let (dzrow, rest) = rest.split_at_mut(p);
    let (all_targets, _) = rest.split_at_mut(rows * k);

    logits::weight_norm_forward(
        mu_t,
        r,
        vn_t,
        inp.v_t,
        prototype_g(inp.g_t, norm_last),
        k,
        p,
    );
    logits::branch_terms_forward(scale_t, bias_t, dbias_t, r, tau_t, p, cfg.kind, cfg.approx);
    logits::weight_norm_forward(
        mu_s,
        r,
        vn_s,
        inp.v_s,
        prototype_g(inp.g_s, norm_last),
        k,
        p,
    );
    logits::branch_terms_forward(scale_s, bias_s, dbias_s, r, tau_s, p, cfg.kind, cfg.approx);
    // From here `r` accumulates dL/dr and `dbias_t` (unused by the teacher) holds target rows.
    let tgt = dbias_t;
    r.fill(T::ZERO);
    dmu.fill(T::ZERO);
    stat.fill(T::ZERO);
    gr.dz_s[..rows * p].fill(T::ZERO);

    let w_stat = T::ONE / T::from_usize(rows);
    if let Centering::Sinkhorn { iters } = cfg.centering {
        // Every patch row's logits first, balanced together (`dots`, `lrow` are free scratch
        // until the row loop).
        for row in 0..rows {
            yrow.copy_from_slice(&inp.z_t[row * p..(row + 1) * p]);
            l2norm_row_inplace(yrow, eps);
            logits::dots_row_forward(dots, yrow, mu_t, k, p);
            let l = &mut all_targets[row * k..(row + 1) * k];
            logits::logits_row_forward(l, dots, scale_t, bias_t);
        }
        crate::sinkhorn::sinkhorn_targets_inplace(all_targets, dots, lrow, rows, k, iters);
        add_row_mean(stat, all_targets, rows, k);
    }
    let mut total = T::ZERO;
    let mut ent = T::ZERO;
    let mut masked = 0usize;
    for img in 0..views * batch {
        let count = masked_count(inp.mask, img, n);
        masked += count;
        let w = T::from_f64(mim_row_weight(count, views, batch));
        for j in 0..n {
            let row = img * n + j;
            // Teacher target at this position (every row: the center needs all of them).
            if cfg.centering.is_sinkhorn() {
                tgt[..k].copy_from_slice(&all_targets[row * k..(row + 1) * k]);
            } else {
                yrow.copy_from_slice(&inp.z_t[row * p..(row + 1) * p]);
                l2norm_row_inplace(yrow, eps);
                logits::dots_row_forward(dots, yrow, mu_t, k, p);
                logits::logits_row_forward(lrow, dots, scale_t, bias_t);
                teacher_targets_row(tgt, stat, lrow, center, tau_t, cfg.centering, w_stat);
            }
            ent += entropy(&tgt[..k]);
            if inp.mask[row] == T::ZERO {
                continue;
            }
            // Student at the masked position: logits, CE against the target, chain back.
            yrow.copy_from_slice(&inp.z_s[row * p..(row + 1) * p]);
            let zn = l2norm_row_inplace(yrow, eps);
            logits::dots_row_forward(dots, yrow, mu_s, k, p);
            logits::logits_row_forward(lrow, dots, scale_s, bias_s);
            total += w * xent_row_forward_backward_inplace(lrow, tgt, T::ONE, w);
            // `tgt` is done: it receives dL/d(dots).
            logits::logits_row_backward(
                tgt,
                if norm_last { None } else { Some(&mut r[..]) },
                lrow,
                dots,
                scale_s,
                dbias_s,
                tau_s,
            );
            logits::dots_row_backward(dyrow, dmu, tgt, yrow, mu_s, k, p);
            l2norm_row_backward(dzrow, dyrow, yrow, zn, eps);
            gr.dz_s[row * p..(row + 1) * p].copy_from_slice(dzrow);
        }
    }

    for kk in 0..k {
        let m = &mu_s[kk * p..(kk + 1) * p];
        l2norm_row_backward(dyrow, &dmu[kk * p..(kk + 1) * p], m, vn_s[kk], eps);
        for (o, &x) in gr.dv_s[kk * p..(kk + 1) * p].iter_mut().zip(dyrow.iter()) {
            *o += x;
        }
    }
    if !norm_last {
        for (o, &x) in gr.dg_s[..k].iter_mut().zip(r.iter()) {
            *o += x;
        }
    }
    center_update(center, stat, T::from_f64(cfg.center_momentum));
    Ok(MimOutput {
        loss: total,
        teacher_entropy: ent / T::from_usize(rows),
        masked,
    })
}

/// iBOT's static settings, shared by every backend (the patch teacher temperature is a per-step
/// schedule and comes with each step).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct IbotConfig {
    /// How the student's global crops are masked.
    pub mask: crate::masking::MaskConfig,
    /// Weight of L_mim in `L_cls + mim_weight * L_mim`.
    pub mim_weight: f64,
    /// Momentum of the patch center.
    pub patch_center_momentum: f64,
}

impl Default for IbotConfig {
    fn default() -> Self {
        Self {
            mask: crate::masking::MaskConfig::default(),
            mim_weight: 1.0,
            patch_center_momentum: 0.9,
        }
    }
}

/// The prototype radii `g` unless `norm_last_layer` fixes them at 1.
fn prototype_g<T>(g: &[T], norm_last: bool) -> Option<&[T]> {
    if norm_last {
        None
    } else {
        Some(g)
    }
}
