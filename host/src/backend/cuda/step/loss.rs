//! The CUDA backend's `[CLS]` loss chain (the CPU backend's `cpu/loss.rs`): prototype terms of
//! each branch, teacher targets with the previous center, the fused student cross-entropy and
//! its gradient, the collapse signals, the center update; all as launches of
//! `ptx/src/kernels/head.rs`.
use anyhow::Result;

use dinovmf_core::logits::NORMALIZE_EPS;
use dinovmf_core::loss::n_pairs;
use dinovmf_ptx::kernels::reduce::RedOp;

use super::{GpuBackend, M_LOSS, M_MAX_MASS, M_MEAN_ENT, M_ROW_ENT};
use crate::backend::cuda::device::{u32_of as u, Arg, Buf, Device, Gpu};
use crate::backend::cuda::ops::{Gemm, Segments};

/// Buffers of the loss chain.
pub(super) struct LossBufs {
    pub(super) mu_s: Buf<f32>,
    pub(super) mu_t: Buf<f32>,
    pub(super) vn_s: Buf<f32>,
    pub(super) vn_t: Buf<f32>,
    pub(super) r: Buf<f32>,
    pub(super) scale_s: Buf<f32>,
    pub(super) bias_s: Buf<f32>,
    pub(super) dbias_s: Buf<f32>,
    pub(super) scale_t: Buf<f32>,
    pub(super) bias_t: Buf<f32>,
    pub(super) dbias_t: Buf<f32>,
    pub(super) y_s: Buf<f32>,
    pub(super) zn_s: Buf<f32>,
    pub(super) y_t: Buf<f32>,
    pub(super) zn_t: Buf<f32>,
    pub(super) dots_t: Buf<f32>,
    pub(super) p_t: Buf<f32>,
    pub(super) lse_raw: Buf<f32>,
    pub(super) stat: Buf<f32>,
    pub(super) dots_s: Buf<f32>,
    pub(super) lse_part: Buf<f32>,
    pub(super) lse: Buf<f32>,
    pub(super) loss_part: Buf<f32>,
    pub(super) dy: Buf<f32>,
    pub(super) dmu: Buf<f32>,
    pub(super) dz: Buf<f32>,
    pub(super) mean_raw: Buf<f32>,
    pub(super) mean_p: Buf<f32>,
    pub(super) ent: Buf<f32>,
    pub(super) max_part: Buf<f32>,
    pub(super) whole_k: Segments,
}

impl LossBufs {
    pub(super) fn new<D: Device>(
        gpu: &mut Gpu<D>,
        n_crops: usize,
        batch: usize,
        k: usize,
        p: usize,
    ) -> Result<Self> {
        let (ns, nt) = (n_crops * batch, 2 * batch);
        let whole_k = Segments::new(gpu, &[(0, k)])?;
        Ok(Self {
            mu_s: gpu.alloc(k * p)?,
            mu_t: gpu.alloc(k * p)?,
            vn_s: gpu.alloc(k)?,
            vn_t: gpu.alloc(k)?,
            r: gpu.alloc(k)?,
            scale_s: gpu.alloc(k)?,
            bias_s: gpu.alloc(k)?,
            dbias_s: gpu.alloc(k)?,
            scale_t: gpu.alloc(k)?,
            bias_t: gpu.alloc(k)?,
            dbias_t: gpu.alloc(k)?,
            y_s: gpu.alloc(ns * p)?,
            zn_s: gpu.alloc(ns)?,
            y_t: gpu.alloc(nt * p)?,
            zn_t: gpu.alloc(nt)?,
            dots_t: gpu.alloc(nt * k)?,
            p_t: gpu.alloc(nt * k)?,
            lse_raw: gpu.alloc(nt)?,
            stat: gpu.alloc(k)?,
            dots_s: gpu.alloc(ns * k)?,
            lse_part: gpu.alloc(ns * k.div_ceil(64) * 2)?,
            lse: gpu.alloc(ns)?,
            loss_part: gpu.alloc(k.div_ceil(256))?,
            dy: gpu.alloc(ns * p)?,
            dmu: gpu.alloc(k * p)?,
            dz: gpu.alloc(ns * p)?,
            mean_raw: gpu.alloc(k)?,
            mean_p: gpu.alloc(k)?,
            ent: gpu.alloc(nt)?,
            max_part: gpu.alloc(whole_k.parts())?,
            whole_k,
        })
    }
}

impl<D: Device> GpuBackend<D> {
    /// `scale`, `bias`, `dbias/dr` and prototype directions of one network's last layer.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn branch(
        &mut self,
        params: Buf<f32>,
        mu: Buf<f32>,
        vn: Buf<f32>,
        terms: [Buf<f32>; 3],
        tau: f32,
    ) -> Result<()> {
        let lay = self.cx.lay;
        self.branch_at(params, lay.last_v, lay.last_g, mu, vn, terms, tau)
    }

    /// [`Self::branch`] of the prototype layer at offsets `v_off` (`[K, p]`), `g_off` (`[K]`).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn branch_at(
        &mut self,
        params: Buf<f32>,
        v_off: usize,
        g_off: usize,
        mu: Buf<f32>,
        vn: Buf<f32>,
        terms: [Buf<f32>; 3],
        tau: f32,
    ) -> Result<()> {
        let (k, p) = (self.cx.cfg.head.out_dim, self.cx.cfg.head.bottleneck);
        let eps = NORMALIZE_EPS as f32;
        let cfg = self.loss_cfg;
        let gpu = &mut self.gpu;
        gpu.l2norm_forward(mu, vn, params.sub(v_off, k * p), k, p, eps)?;
        let r = self.lb.r;
        if cfg.norm_last_layer {
            gpu.fill(r, 1.0)?;
        } else {
            gpu.copy(r, params.sub(g_off, k))?;
        }
        gpu.launch(
            "branch_terms",
            &[
                terms[0].into(),
                terms[1].into(),
                terms[2].into(),
                r.into(),
                u(k),
                tau.into(),
                u(p),
                cfg.kind.code().into(),
                cfg.approx.code().into(),
            ],
        )
    }

    /// The `[CLS]` loss chain: teacher targets, center statistic and collapse signals, student
    /// loss and `dL/dz_s` (in `lb.dz`), prototype gradients into `grads`, center update.
    pub(super) fn cls_loss_chain(&mut self, tau_t: f32) -> Result<()> {
        let cfg = self.loss_cfg;
        let lay = self.cx.lay;
        let (k, p) = (self.cx.cfg.head.out_dim, self.cx.cfg.head.bottleneck);
        let batch = self.shapes.batch;
        let n_crops = 2 + self.shapes.n_local;
        let (nt, ns) = (2 * batch, n_crops * batch);
        let tau_s = cfg.student_temp as f32;
        let eps = NORMALIZE_EPS as f32;
        let lb = &self.lb;
        let (mu_t, vn_t, terms_t) = (lb.mu_t, lb.vn_t, [lb.scale_t, lb.bias_t, lb.dbias_t]);
        let (mu_s, vn_s, terms_s) = (lb.mu_s, lb.vn_s, [lb.scale_s, lb.bias_s, lb.dbias_s]);

        // Teacher: targets with the previous center, the batch statistic, collapse signals.
        let teacher = self.teacher;
        self.branch(teacher, mu_t, vn_t, terms_t, tau_t)?;
        let student = self.student;
        self.branch(student, mu_s, vn_s, terms_s, tau_s)?;
        let lb = &self.lb;
        let gpu = &mut self.gpu;
        let cent = cfg.centering;
        gpu.l2norm_forward(lb.y_t, lb.zn_t, self.head_t.z(), nt, p, eps)?;
        gpu.teacher_targets(
            [lb.p_t, lb.lse_raw, lb.dots_t, lb.stat],
            lb.y_t,
            mu_t,
            lb.scale_t,
            lb.bias_t,
            self.center,
            tau_t,
            cent,
            nt,
            k,
            p,
        )?;
        let m = self.metrics;
        gpu.launch("row_entropy", &[lb.ent.into(), lb.p_t.into(), u(nt), u(k)])?;
        gpu.reduce_final(
            m.sub(M_ROW_ENT, 1),
            lb.ent,
            nt,
            1,
            RedOp::Sum,
            1.0 / nt as f32,
        )?;
        gpu.column_sum(lb.mean_raw, lb.p_t, nt, k, false)?;
        gpu.fill(lb.mean_p, 0.0)?;
        gpu.axpy(lb.mean_p, lb.mean_raw, 1.0 / nt as f32, k)?;
        gpu.launch(
            "row_entropy",
            &[m.sub(M_MEAN_ENT, 1).into(), lb.mean_p.into(), u(1), u(k)],
        )?;
        gpu.reduce_segments(lb.max_part, lb.mean_p, &lb.whole_k, RedOp::MaxAbs)?;
        gpu.reduce_final(
            m.sub(M_MAX_MASS, 1),
            lb.max_part,
            lb.whole_k.parts(),
            1,
            RedOp::MaxAbs,
            1.0,
        )?;

        // Student: logits with per-tile LSE, fused cross-entropy + gradient, backward GEMMs.
        gpu.l2norm_forward(lb.y_s, lb.zn_s, self.head_s.z(), ns, p, eps)?;
        gpu.logits_with_lse(
            lb.dots_s,
            lb.lse_part,
            lb.lse,
            lb.y_s,
            mu_s,
            lb.scale_s,
            lb.bias_s,
            ns,
            k,
            p,
        )?;
        let dr = if cfg.norm_last_layer {
            Arg::Null
        } else {
            self.grads.sub(lay.last_g, k).into()
        };
        gpu.launch(
            "xent_columns",
            &[
                lb.dots_s.into(),
                dr,
                lb.loss_part.into(),
                lb.lse.into(),
                lb.p_t.into(),
                lb.scale_s.into(),
                lb.bias_s.into(),
                lb.dbias_s.into(),
                tau_s.into(),
                u(n_crops),
                u(batch),
                u(k),
            ],
        )?;
        let gs = 1.0 / (batch * n_pairs(n_crops)).max(1) as f32;
        gpu.reduce_final(
            m.sub(M_LOSS, 1),
            lb.loss_part,
            k.div_ceil(256),
            1,
            RedOp::Sum,
            gs,
        )?;
        // dots_s now holds dL/d(dots).
        gpu.matmul_nn(lb.dy, lb.dots_s, mu_s, ns, p, k)?;
        gpu.gemm(
            &Gemm::plain(true, false, k, p, ns),
            lb.dmu,
            lb.dots_s,
            lb.y_s,
            None,
        )?;
        gpu.l2norm_backward(lb.dz, lb.dy, lb.y_s, lb.zn_s, ns, p, eps)?;
        gpu.l2norm_backward(
            self.grads.sub(lay.last_v, k * p),
            lb.dmu,
            mu_s,
            vn_s,
            k,
            p,
            eps,
        )?;

        // The center moves after the targets used the old one.
        gpu.launch(
            "center_update",
            &[
                self.center.into(),
                lb.stat.into(),
                (cfg.center_momentum as f32).into(),
                u(k),
            ],
        )
    }
}
