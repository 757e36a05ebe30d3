//! The `[CLS]` loss chain on a device (the CPU backend's `cpu/loss.rs`): prototype terms of each
//! branch, teacher targets with the previous center, the fused student cross-entropy and its
//! gradient, the collapse signals, the center update; all as launches of
//! `ptx/src/kernels/head.rs`.
//!
//! A free function over explicit device buffers ([`ClsLoss`]) and sizes (core's [`LossDims`]):
//! the CUDA backend calls it on its resident buffers, and the kernel table (`verify.rs`, case
//! `cls loss chain`) calls it on random ones against `core::loss::multicrop_loss_forward_backward`
//! in f64, so the checked chain is the one that trains.
use anyhow::Result;

use dinovmf_core::logits::NORMALIZE_EPS;
use dinovmf_core::loss::{n_pairs, LossConfig, LossDims};
use dinovmf_ptx::kernels::reduce::RedOp;

use super::device::{Buf, Device, Gpu};
use super::launch::head::{
    branch_terms, center_update, row_entropy, xent_columns, BranchDims, LogitTerms, XentColumns,
};
use super::ops::{Gemm, Segments};
use super::ranks::BatchScope;

/// One network's prototype layer on the device: directions `v[K, p]` and radii `g[K]` (the
/// `[CLS]` last layer, or iBOT's patch layer).
#[derive(Clone, Copy, Debug)]
pub struct Prototypes {
    pub v: Buf<f32>,
    pub g: Buf<f32>,
}

impl Prototypes {
    /// The layer at offsets `v_off` (`[K, p]`) and `g_off` (`[K]`) of a flat parameter buffer.
    pub fn at(params: Buf<f32>, v_off: usize, g_off: usize, k: usize, p: usize) -> Self {
        Self {
            v: params.sub(v_off, k * p),
            g: params.sub(g_off, k),
        }
    }
}

/// Per-prototype terms of one branch (teacher or student): unit directions `mu[K, p]`, their
/// norms, and the logits' terms.
#[derive(Clone, Copy, Debug)]
pub struct BranchBufs {
    pub mu: Buf<f32>,
    pub vn: Buf<f32>,
    pub terms: LogitTerms,
}

impl BranchBufs {
    fn new<D: Device>(gpu: &mut Gpu<D>, k: usize, p: usize) -> Result<Self> {
        Ok(Self {
            mu: gpu.alloc(k * p)?,
            vn: gpu.alloc(k)?,
            terms: LogitTerms {
                scale: gpu.alloc(k)?,
                bias: gpu.alloc(k)?,
                dbias: gpu.alloc(k)?,
            },
        })
    }
}

/// Scratch of the loss chain (and the student's `dL/dz` in [`Self::dz`]).
pub struct LossBufs {
    pub t: BranchBufs,
    pub s: BranchBufs,
    /// The radii a branch uses (1 with `norm_last_layer`).
    pub r: Buf<f32>,
    pub y_s: Buf<f32>,
    pub zn_s: Buf<f32>,
    pub y_t: Buf<f32>,
    pub zn_t: Buf<f32>,
    pub dots_t: Buf<f32>,
    pub p_t: Buf<f32>,
    pub lse_raw: Buf<f32>,
    pub stat: Buf<f32>,
    pub dots_s: Buf<f32>,
    pub lse_part: Buf<f32>,
    pub lse: Buf<f32>,
    pub loss_part: Buf<f32>,
    pub dy: Buf<f32>,
    pub dmu: Buf<f32>,
    /// `dL/dz_s`, the student head output's gradient: `[n_crops B, p]` first (iBOT's backend
    /// grows it for the masked patch rows after them).
    pub dz: Buf<f32>,
    pub mean_raw: Buf<f32>,
    pub mean_p: Buf<f32>,
    pub ent: Buf<f32>,
    pub max_part: Buf<f32>,
    pub whole_k: Segments,
}

impl LossBufs {
    pub fn new<D: Device>(gpu: &mut Gpu<D>, dims: LossDims) -> Result<Self> {
        let LossDims {
            n_crops,
            batch,
            k,
            p,
        } = dims;
        let (ns, nt) = (n_crops * batch, 2 * batch);
        let whole_k = Segments::new(gpu, &[(0, k)])?;
        Ok(Self {
            t: BranchBufs::new(gpu, k, p)?,
            s: BranchBufs::new(gpu, k, p)?,
            r: gpu.alloc(k)?,
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

/// The one-value outputs of the `[CLS]` chain (slots of the backend's metrics buffer).
#[derive(Clone, Copy, Debug)]
pub struct ClsMetrics {
    /// The loss `L_cls`.
    pub loss: Buf<f32>,
    /// Mean entropy of the teacher's rows, `mean_b H(P_t,b)`.
    pub teacher_entropy: Buf<f32>,
    /// Entropy of the batch mean of the teacher's rows.
    pub mean_entropy: Buf<f32>,
    /// The largest entry of that mean.
    pub max_mass: Buf<f32>,
}

/// The device buffers one `[CLS]` loss call reads and writes.
#[derive(Clone, Copy, Debug)]
pub struct ClsLoss {
    /// Teacher head outputs `[2B, p]` (global crops) and student ones `[n_crops B, p]`.
    pub z_t: Buf<f32>,
    pub z_s: Buf<f32>,
    pub teacher: Prototypes,
    pub student: Prototypes,
    /// The `[CLS]` center `[K]`: read by the targets, then moved by the batch statistic.
    pub center: Buf<f32>,
    /// The student prototypes' gradients: `dL/dv` written, `dL/dg` ADDED (untouched with
    /// `norm_last_layer`).
    pub grad: Prototypes,
    pub metrics: ClsMetrics,
}

/// `scale`, `bias`, `dbias/dr` and unit directions of one branch's prototype layer at
/// temperature `tau`, into `out` (`r` takes the radii used).
#[allow(clippy::too_many_arguments)]
pub fn branch_forward<D: Device>(
    gpu: &mut Gpu<D>,
    cfg: &LossConfig,
    layer: Prototypes,
    out: &BranchBufs,
    r: Buf<f32>,
    tau: f32,
    k: usize,
    p: usize,
) -> Result<()> {
    let eps = NORMALIZE_EPS as f32;
    gpu.l2norm_forward(out.mu, out.vn, layer.v, k, p, eps)?;
    if cfg.norm_last_layer {
        gpu.fill(r, 1.0)?;
    } else {
        gpu.copy(r, layer.g)?;
    }
    let dims = BranchDims {
        k,
        p,
        tau,
        kind: cfg.kind,
        approx: cfg.approx,
    };
    branch_terms(gpu, out.terms, r, dims)
}

/// The `[CLS]` loss forward and backward with the teacher at temperature `tau_t`: teacher
/// targets, center statistic and collapse signals, student loss and `dL/dz_s` (in `lb.dz`),
/// prototype gradients into `io.grad`, then the center update.
pub fn cls_loss_forward_backward<D: Device>(
    gpu: &mut Gpu<D>,
    cfg: &LossConfig,
    dims: LossDims,
    tau_t: f32,
    io: &ClsLoss,
    lb: &LossBufs,
) -> Result<()> {
    cls_loss_forward_backward_with(gpu, cfg, dims, tau_t, io, lb, &mut BatchScope::Whole)
}

/// [`cls_loss_forward_backward`] on the rows of `scope`: with a shard, Sinkhorn-Knopp balances
/// over every rank's rows, and the center is left alone (the statistic `lb.stat`, the collapse
/// signals and the loss are this rank's; the caller reduces them over ranks and then moves the
/// center).
pub fn cls_loss_forward_backward_with<D: Device>(
    gpu: &mut Gpu<D>,
    cfg: &LossConfig,
    dims: LossDims,
    tau_t: f32,
    io: &ClsLoss,
    lb: &LossBufs,
    scope: &mut BatchScope<'_>,
) -> Result<()> {
    let LossDims {
        n_crops,
        batch,
        k,
        p,
    } = dims;
    let (nt, ns) = (2 * batch, n_crops * batch);
    let tau_s = cfg.student_temp as f32;
    let eps = NORMALIZE_EPS as f32;
    let (t, s, m) = (&lb.t, &lb.s, &io.metrics);

    // Teacher: targets with the previous center, the batch statistic, collapse signals.
    branch_forward(gpu, cfg, io.teacher, t, lb.r, tau_t, k, p)?;
    branch_forward(gpu, cfg, io.student, s, lb.r, tau_s, k, p)?;
    gpu.l2norm_forward(lb.y_t, lb.zn_t, io.z_t, nt, p, eps)?;
    gpu.teacher_targets(
        [lb.p_t, lb.lse_raw, lb.dots_t, lb.stat],
        lb.y_t,
        t.mu,
        t.terms.scale,
        t.terms.bias,
        io.center,
        tau_t,
        cfg.centering,
        (nt, k, p),
        scope,
    )?;
    row_entropy(gpu, lb.ent, lb.p_t, nt, k)?;
    gpu.reduce_final(
        m.teacher_entropy,
        lb.ent,
        nt,
        1,
        RedOp::Sum,
        1.0 / nt as f32,
    )?;
    gpu.column_sum(lb.mean_raw, lb.p_t, nt, k, false)?;
    gpu.fill(lb.mean_p, 0.0)?;
    gpu.axpy(lb.mean_p, lb.mean_raw, 1.0 / nt as f32, k)?;
    row_entropy(gpu, m.mean_entropy, lb.mean_p, 1, k)?;
    gpu.reduce_segments(lb.max_part, lb.mean_p, &lb.whole_k, RedOp::MaxAbs)?;
    gpu.reduce_final(
        m.max_mass,
        lb.max_part,
        lb.whole_k.parts(),
        1,
        RedOp::MaxAbs,
        1.0,
    )?;

    // Student: logits with per-tile LSE, fused cross-entropy + gradient, backward GEMMs.
    gpu.l2norm_forward(lb.y_s, lb.zn_s, io.z_s, ns, p, eps)?;
    gpu.logits_with_lse(
        lb.dots_s,
        lb.lse_part,
        lb.lse,
        lb.y_s,
        s.mu,
        s.terms.scale,
        s.terms.bias,
        ns,
        k,
        p,
    )?;
    xent_columns(
        gpu,
        &XentColumns {
            dots: lb.dots_s,
            dr: (!cfg.norm_last_layer).then_some(io.grad.g),
            loss_part: lb.loss_part,
            lse: lb.lse,
            p_t: lb.p_t,
            terms: s.terms,
            tau: tau_s,
            n_crops,
            batch,
            k,
        },
    )?;
    let gs = 1.0 / (batch * n_pairs(n_crops)).max(1) as f32;
    gpu.reduce_final(m.loss, lb.loss_part, k.div_ceil(256), 1, RedOp::Sum, gs)?;
    // dots_s now holds dL/d(dots).
    gpu.matmul_nn(lb.dy, lb.dots_s, s.mu, ns, p, k)?;
    gpu.gemm(
        &Gemm::plain(true, false, k, p, ns),
        lb.dmu,
        lb.dots_s,
        lb.y_s,
        None,
    )?;
    gpu.l2norm_backward(lb.dz.sub(0, ns * p), lb.dy, lb.y_s, lb.zn_s, ns, p, eps)?;
    gpu.l2norm_backward(io.grad.v, lb.dmu, s.mu, s.vn, k, p, eps)?;

    // The center moves after the targets used the old one.
    if scope.center_moves_in_place() {
        center_update(gpu, io.center, lb.stat, cfg.center_momentum as f32, k)?;
    }
    Ok(())
}
