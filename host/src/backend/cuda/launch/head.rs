//! Launchers of `ptx/src/kernels/head.rs` and the logits GEMM (`gemm_logits_f32`).
use anyhow::Result;

use dinovmf_core::centering::Centering;
use dinovmf_core::logits::LogitKind;
use dinovmf_core::vmf::BesselApprox;

use crate::backend::cuda::device::{u32_of as u, Arg, Buf, Device, Gpu};

/// Per-prototype terms of one branch's logits `l_k = scale_k dot_k + bias_k`, and
/// `dbias_k / dr_k`.
#[derive(Clone, Copy, Debug)]
pub struct LogitTerms {
    pub scale: Buf<f32>,
    pub bias: Buf<f32>,
    pub dbias: Buf<f32>,
}

/// How the logit terms are formed: DINO or vMF, the Bessel approximation, temperature `tau`,
/// `k` prototypes of width `p`.
#[derive(Clone, Copy, Debug)]
pub struct BranchDims {
    pub k: usize,
    pub p: usize,
    pub tau: f32,
    pub kind: LogitKind,
    pub approx: BesselApprox,
}

/// `scale`, `bias`, `dbias/dr` of the radii `r[k]`.
pub fn branch_terms<D: Device>(
    gpu: &mut Gpu<D>,
    out: LogitTerms,
    r: Buf<f32>,
    d: BranchDims,
) -> Result<()> {
    gpu.launch(
        "branch_terms",
        &[
            out.scale.into(),
            out.bias.into(),
            out.dbias.into(),
            r.into(),
            u(d.k),
            d.tau.into(),
            u(d.p),
            d.kind.code().into(),
            d.approx.code().into(),
        ],
    )
}

/// `dots[n, k] = y[n, p] mu[k, p]^T` and each 64-column tile's log-sum-exp state of
/// `scale dots + bias` in `lse_part[n, ceil(k / 64), 2]`.
#[allow(clippy::too_many_arguments)]
pub fn gemm_logits_f32<D: Device>(
    gpu: &mut Gpu<D>,
    dots: Buf<f32>,
    lse_part: Buf<f32>,
    y: Buf<f32>,
    mu: Buf<f32>,
    scale: Buf<f32>,
    bias: Buf<f32>,
    (n, k, p): (usize, usize, usize),
) -> Result<()> {
    gpu.launch(
        "gemm_logits_f32",
        &[
            dots.into(),
            lse_part.into(),
            y.into(),
            mu.into(),
            scale.into(),
            bias.into(),
            u(n),
            u(k),
            u(p),
        ],
    )
}

/// Row log-sum-exps `lse[n]` from `ntiles` per-tile states per row.
pub fn lse_combine<D: Device>(
    gpu: &mut Gpu<D>,
    lse: Buf<f32>,
    lse_part: Buf<f32>,
    n: usize,
    ntiles: usize,
) -> Result<()> {
    gpu.launch(
        "lse_combine",
        &[lse.into(), lse_part.into(), u(n), u(ntiles)],
    )
}

/// The teacher's inputs: raw dots `[n, k]`, the terms' `scale` and `bias`, the center, the
/// temperature and the centering.
#[derive(Clone, Copy, Debug)]
pub struct TeacherIn {
    pub dots: Buf<f32>,
    pub scale: Buf<f32>,
    pub bias: Buf<f32>,
    pub tau_t: f32,
    pub centering: Centering,
    pub n: usize,
    pub k: usize,
}

/// Centered targets `p_t[n, k]` with `center`, and the raw logits' row log-sum-exps.
pub fn teacher_targets<D: Device>(
    gpu: &mut Gpu<D>,
    p_t: Buf<f32>,
    lse_raw: Buf<f32>,
    center: Buf<f32>,
    t: &TeacherIn,
) -> Result<()> {
    gpu.launch(
        "teacher_targets",
        &[
            p_t.into(),
            lse_raw.into(),
            t.dots.into(),
            t.scale.into(),
            t.bias.into(),
            center.into(),
            t.tau_t.into(),
            t.centering.code().into(),
            u(t.n),
            u(t.k),
        ],
    )
}

/// The batch statistic `stat[k]` the center update reads.
pub fn teacher_stat<D: Device>(
    gpu: &mut Gpu<D>,
    stat: Buf<f32>,
    lse_raw: Buf<f32>,
    t: &TeacherIn,
) -> Result<()> {
    gpu.launch(
        "teacher_stat",
        &[
            stat.into(),
            t.dots.into(),
            t.scale.into(),
            t.bias.into(),
            lse_raw.into(),
            t.tau_t.into(),
            t.centering.code().into(),
            u(t.n),
            u(t.k),
        ],
    )
}

/// The fused multi-crop cross-entropy: `dots[n_crops B, k]` become `dL/d dots`, `dL/dr` is
/// added into `dr` (when given), loss partials per 256-column block into `loss_part`.
#[derive(Clone, Copy, Debug)]
pub struct XentColumns {
    pub dots: Buf<f32>,
    pub dr: Option<Buf<f32>>,
    pub loss_part: Buf<f32>,
    pub lse: Buf<f32>,
    pub p_t: Buf<f32>,
    pub terms: LogitTerms,
    pub tau: f32,
    pub n_crops: usize,
    pub batch: usize,
    pub k: usize,
}

pub fn xent_columns<D: Device>(gpu: &mut Gpu<D>, a: &XentColumns) -> Result<()> {
    gpu.launch(
        "xent_columns",
        &[
            a.dots.into(),
            a.dr.map_or(Arg::Null, Arg::from),
            a.loss_part.into(),
            a.lse.into(),
            a.p_t.into(),
            a.terms.scale.into(),
            a.terms.bias.into(),
            a.terms.dbias.into(),
            a.tau.into(),
            u(a.n_crops),
            u(a.batch),
            u(a.k),
        ],
    )
}

/// `ent[r] = H(p[r, ..k])` for `rows` probability rows.
pub fn row_entropy<D: Device>(
    gpu: &mut Gpu<D>,
    ent: Buf<f32>,
    p: Buf<f32>,
    rows: usize,
    k: usize,
) -> Result<()> {
    gpu.launch("row_entropy", &[ent.into(), p.into(), u(rows), u(k)])
}

/// `center = momentum center + (1 - momentum) stat` over `k` entries.
pub fn center_update<D: Device>(
    gpu: &mut Gpu<D>,
    center: Buf<f32>,
    stat: Buf<f32>,
    momentum: f32,
    k: usize,
) -> Result<()> {
    gpu.launch(
        "center_update",
        &[center.into(), stat.into(), momentum.into(), u(k)],
    )
}
