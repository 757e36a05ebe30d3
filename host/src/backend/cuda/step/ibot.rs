//! iBOT's buffers, mask tables and patch-loss chain on a [`Device`], the CUDA counterpart of
//! `backend/cpu/ibot.rs` (the gpu_sim tests hold the two to each other); the step's order is
//! `backend/step.rs`'s.
//!
//! Row layouts of the head are the CPU backend's: the teacher's input is the `[CLS]` rows of the
//! two global crops (`2B`) followed by every patch row (`2B np`, image-major); the student's is
//! the `[CLS]` rows of every crop followed by the masked patch rows only (`M`, in row order).
//! Masks come from `backend/step.rs` on the host (the same as the CPU backend's), so both
//! backends see the same masks; the host also uploads the gather indices and row weights.
use anyhow::{ensure, Result};

use dinovmf_core::centering::center_init;
use dinovmf_core::logits::NORMALIZE_EPS;
use dinovmf_core::mim_loss::{mim_row_weight, IbotConfig};

use super::{GpuBackend, M_LOSS, M_MIM, M_PATCH_ENT};
use crate::backend::cuda::device::{Buf, Device};
use crate::backend::cuda::head::{self, HeadBufs};
use crate::backend::cuda::launch::head::{center_update, row_entropy};
use crate::backend::cuda::launch::ibot::{xent_masked, XentMasked};
use crate::backend::cuda::loss::{branch_forward, Prototypes};
use crate::backend::cuda::ops::Gemm;
use crate::backend::cuda::ranks::BatchScope;
use crate::backend::step::StepMasks;
use crate::backend::StepMetrics;
use dinovmf_ptx::kernels::reduce::RedOp;

/// Rows that receive nothing from a gather (see `gather_rows`).
const NONE: u64 = u64::MAX;

/// iBOT's buffers and state on the device.
pub struct IbotGpu {
    pub cfg: IbotConfig,
    /// `M`, the masked rows of this step.
    pub(super) masked: usize,
    idx_host: Vec<u64>,
    tgt_host: Vec<u64>,
    w_host: Vec<f32>,
    inv_host: Vec<u64>,
    /// 0/1 mask of the student's global patches `[2B, np]`.
    pub(super) mask: Buf<f32>,
    /// Per masked row: its token row in `[2B, t]`, its teacher patch row, its weight.
    pub(super) idx: Buf<u64>,
    tgt: Buf<u64>,
    w: Buf<f32>,
    /// Per global token row: its row in the student head's input, or [`NONE`].
    pub(super) inv: Buf<u64>,
    /// Teacher head input rows from the token grid (constant).
    pub(super) idx_t: Buf<u64>,
    pub(super) dnorm: Buf<f32>,
    y_t: Buf<f32>,
    zn_t: Buf<f32>,
    dots_t: Buf<f32>,
    p_t: Buf<f32>,
    lse_raw: Buf<f32>,
    ent: Buf<f32>,
    stat: Buf<f32>,
    y_s: Buf<f32>,
    zn_s: Buf<f32>,
    dots_s: Buf<f32>,
    lse_part: Buf<f32>,
    lse: Buf<f32>,
    loss_part: Buf<f32>,
    dy: Buf<f32>,
    dv: Buf<f32>,
    /// The patch center.
    pub center: Buf<f32>,
}

impl IbotGpu {
    /// The patch center and its batch statistic of the last patch loss (this rank's rows).
    pub(super) fn center_and_stat(&self) -> (Buf<f32>, Buf<f32>) {
        (self.center, self.stat)
    }
}

impl<D: Device> GpuBackend<D> {
    /// Turns this backend into an iBOT one (the model must have the mask token); as a rank of
    /// a data-parallel run too (see `step/ranks.rs`).
    pub fn with_ibot(mut self, cfg: IbotConfig) -> Result<Self> {
        let lay = self.cx.lay;
        ensure!(
            lay.mask_token.is_some(),
            "iBOT needs a model with a mask token (backbone.masked_embed)"
        );
        let cx = self.cx;
        let (d, k, p) = (cx.d, cx.cfg.head.out_dim, cx.cfg.head.bottleneck);
        let b = self.shapes.batch;
        let n_g = 2 * b;
        let (t, np) = (self.glob.t, self.glob.np);
        let rows_s = n_g + self.shapes.n_local * b;
        let rows_t = n_g * np;
        let cap_s = rows_s + rows_t;
        let gpu = &mut self.gpu;
        self.glob.enable_all_tokens(gpu, &cx)?;
        self.head_s = HeadBufs::new(gpu, &cx, cap_s)?;
        self.head_t = HeadBufs::new(gpu, &cx, n_g * t)?;
        let hw = head::head_width(&cx);
        self.x_t = gpu.alloc(n_g * t * d)?;
        self.x_s = gpu.alloc(cap_s * d)?;
        self.dx_s = gpu.alloc(cap_s * d)?;
        self.hs0 = gpu.alloc(cap_s * hw)?;
        self.hs1 = gpu.alloc(cap_s * hw)?;
        self.lb.dz = gpu.alloc(cap_s * p)?;
        let mut idx_t: Vec<u64> = (0..n_g).map(|i| (i * t) as u64).collect();
        for img in 0..n_g {
            idx_t.extend((0..np).map(|j| (img * t + 1 + j) as u64));
        }
        let mut c0 = vec![0.0f32; k];
        center_init(&mut c0, self.loss_cfg.centering);
        self.masks = StepMasks::new(&cx.cfg, &self.shapes, true);
        self.ibot = Some(IbotGpu {
            cfg,
            masked: 0,
            idx_host: Vec::with_capacity(rows_t),
            tgt_host: Vec::with_capacity(rows_t),
            w_host: Vec::with_capacity(rows_t),
            inv_host: vec![NONE; n_g * t],
            mask: gpu.alloc(rows_t)?,
            idx: gpu.alloc(rows_t)?,
            tgt: gpu.alloc(rows_t)?,
            w: gpu.alloc(rows_t)?,
            inv: gpu.alloc(n_g * t)?,
            idx_t: gpu.alloc_from(&idx_t)?,
            dnorm: gpu.alloc(n_g * t * d)?,
            y_t: gpu.alloc(rows_t * p)?,
            zn_t: gpu.alloc(rows_t)?,
            dots_t: gpu.alloc(rows_t * k)?,
            p_t: gpu.alloc(rows_t * k)?,
            lse_raw: gpu.alloc(rows_t)?,
            ent: gpu.alloc(rows_t)?,
            stat: gpu.alloc(k)?,
            y_s: gpu.alloc(rows_t * p)?,
            zn_s: gpu.alloc(rows_t)?,
            dots_s: gpu.alloc(rows_t * k)?,
            lse_part: gpu.alloc(rows_t * k.div_ceil(64) * 2)?,
            lse: gpu.alloc(rows_t)?,
            loss_part: gpu.alloc(k.div_ceil(256))?,
            dy: gpu.alloc(rows_t * p)?,
            dv: gpu.alloc(k * p)?,
            center: gpu.alloc_from(&c0)?,
        });
        Ok(self)
    }

    /// Uploads the step's patch mask and its per-masked-row tables; sets `ib.masked` (`M`).
    pub(super) fn upload_patch_masks(&mut self, ib: &mut IbotGpu) -> Result<()> {
        let b = self.shapes.batch;
        let n_g = 2 * b;
        let rows_s = n_g + self.shapes.n_local * b;
        let (t, np) = (self.glob.t, self.glob.np);
        let mask = &self.masks.patch;
        ib.idx_host.clear();
        ib.tgt_host.clear();
        ib.w_host.clear();
        ib.inv_host.fill(NONE);
        for img in 0..n_g {
            ib.inv_host[img * t] = img as u64;
            let w = mim_row_weight(self.masks.counts[img], 2, b) as f32;
            for j in 0..np {
                let r = img * np + j;
                if mask[r] != 0.0 {
                    let tok = img * t + 1 + j;
                    ib.inv_host[tok] = (rows_s + ib.idx_host.len()) as u64;
                    ib.idx_host.push(tok as u64);
                    ib.tgt_host.push(r as u64);
                    ib.w_host.push(w);
                }
            }
        }
        let m = ib.idx_host.len();
        ib.masked = m;
        let gpu = &mut self.gpu;
        gpu.upload(ib.mask, mask)?;
        gpu.upload(ib.inv, &ib.inv_host)?;
        if m > 0 {
            gpu.upload(ib.idx.sub(0, m), &ib.idx_host)?;
            gpu.upload(ib.tgt.sub(0, m), &ib.tgt_host)?;
            gpu.upload(ib.w.sub(0, m), &ib.w_host)?;
        }
        Ok(())
    }

    /// L_mim: teacher targets at every patch with the previous patch center, its statistic and
    /// the patch center update, the mean target entropy; with `m > 0` masked rows, the weighted
    /// cross-entropy of the student at them, `dL/dz` into `lb.dz` after the `[CLS]` rows and
    /// the patch prototypes' gradients ADDED into `grads` (all scaled by the MIM weight).
    pub(super) fn patch_loss_chain(&mut self, ib: &IbotGpu, tau_t: f32) -> Result<()> {
        let m = ib.masked;
        let cfg = self.loss_cfg;
        let lay = self.cx.lay;
        let (k, p) = (self.cx.cfg.head.out_dim, self.cx.cfg.head.bottleneck);
        let b = self.shapes.batch;
        let n_g = 2 * b;
        let rows_s = n_g + self.shapes.n_local * b;
        let rows_t = n_g * self.glob.np;
        let tau_s = cfg.student_temp as f32;
        let eps = NORMALIZE_EPS as f32;
        let lb = &self.lb;
        let gpu = &mut self.gpu;
        let (t, s) = (&lb.t, &lb.s);
        let at = |params| Prototypes::at(params, lay.patch_v, lay.patch_g, k, p);
        branch_forward(gpu, &cfg, at(self.teacher), t, lb.r, tau_t, k, p)?;
        branch_forward(gpu, &cfg, at(self.student), s, lb.r, tau_s, k, p)?;
        let cent = cfg.centering;
        let mt = self.metrics;

        let mut scope = match self.ranks.as_mut() {
            Some(r) => r.scope(),
            None => BatchScope::Whole,
        };

        // Teacher: every patch row (after the 2B `[CLS]` rows of the head output); with
        // Sinkhorn-Knopp balanced over every rank's patch rows.
        let z_t = self.head_t.z().sub(n_g * p, rows_t * p);
        gpu.l2norm_forward(ib.y_t, ib.zn_t, z_t, rows_t, p, eps)?;
        gpu.teacher_targets(
            [ib.p_t, ib.lse_raw, ib.dots_t, ib.stat],
            ib.y_t,
            t.mu,
            t.terms.scale,
            t.terms.bias,
            ib.center,
            tau_t,
            cent,
            (rows_t, k, p),
            &mut scope,
        )?;
        row_entropy(gpu, ib.ent, ib.p_t, rows_t, k)?;
        gpu.reduce_final(
            mt.sub(M_PATCH_ENT, 1),
            ib.ent,
            rows_t,
            1,
            RedOp::Sum,
            1.0 / rows_t as f32,
        )?;
        if m == 0 {
            gpu.fill(mt.sub(M_MIM, 1), 0.0)?;
        } else {
            // Student at the masked rows.
            let z_s = self.head_s.z().sub(rows_s * p, m * p);
            gpu.l2norm_forward(ib.y_s, ib.zn_s, z_s, m, p, eps)?;
            gpu.logits_with_lse(
                ib.dots_s,
                ib.lse_part,
                ib.lse,
                ib.y_s,
                s.mu,
                s.terms.scale,
                s.terms.bias,
                m,
                k,
                p,
            )?;
            xent_masked(
                gpu,
                &XentMasked {
                    dots: ib.dots_s,
                    dr: (!cfg.norm_last_layer).then(|| self.grads.sub(lay.patch_g, k)),
                    loss_part: ib.loss_part,
                    lse: ib.lse,
                    p_t: ib.p_t,
                    tgt: ib.tgt,
                    w: ib.w,
                    terms: s.terms,
                    tau: tau_s,
                    grad_scale: ib.cfg.mim_weight as f32,
                    m,
                    k,
                    t_rows: rows_t,
                },
            )?;
            gpu.reduce_final(
                mt.sub(M_MIM, 1),
                ib.loss_part,
                k.div_ceil(256),
                1,
                RedOp::Sum,
                1.0,
            )?;
            // dots_s now holds dL/d(dots).
            gpu.matmul_nn(ib.dy, ib.dots_s, s.mu, m, p, k)?;
            gpu.gemm(
                &Gemm::plain(true, false, k, p, m),
                lb.dmu,
                ib.dots_s,
                ib.y_s,
                None,
            )?;
            gpu.l2norm_backward(
                lb.dz.sub(rows_s * p, m * p),
                ib.dy,
                ib.y_s,
                ib.zn_s,
                m,
                p,
                eps,
            )?;
            gpu.l2norm_backward(ib.dv, lb.dmu, s.mu, s.vn, k, p, eps)?;
            gpu.axpy(self.grads.sub(lay.patch_v, k * p), ib.dv, 1.0, k * p)?;
        }
        // The patch center moves after the targets used the old one (over ranks: in the
        // reduce phase, from the global statistic).
        if scope.center_moves_in_place() {
            let momentum = ib.cfg.patch_center_momentum as f32;
            center_update(gpu, ib.center, ib.stat, momentum, k)?;
        }
        Ok(())
    }

    /// The metrics of an iBOT step from the downloaded metrics buffer.
    pub(super) fn ibot_metrics(&self, m: &[f32], grad_norm: f32) -> StepMetrics {
        let w = self
            .ibot
            .as_ref()
            .map_or(1.0, |ib| ib.cfg.mim_weight as f32);
        let (cls, mim) = (m[M_LOSS], m[M_MIM]);
        StepMetrics {
            loss: cls + w * mim,
            teacher_entropy: m[super::M_ROW_ENT],
            mean_entropy: m[super::M_MEAN_ENT],
            max_mass: m[super::M_MAX_MASS],
            kl: cls - m[super::M_ROW_ENT],
            grad_norm,
            cls_loss: cls,
            mim_loss: mim,
            patch_teacher_entropy: m[M_PATCH_ENT],
        }
    }
}
