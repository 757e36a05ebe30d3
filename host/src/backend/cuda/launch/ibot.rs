//! Launchers of `ptx/src/kernels/ibot.rs`: the mask-token substitution, the row gather and
//! the patch loss's weighted cross-entropy.
use anyhow::Result;

use super::head::LogitTerms;
use crate::backend::cuda::device::{u32_of as u, Arg, Buf, Device, Gpu};

/// `x[r] = token` for the `n` rows of width `d` whose `mask[r]` is set.
pub fn mask_tokens_forward<D: Device>(
    gpu: &mut Gpu<D>,
    x: Buf<f32>,
    mask: Buf<f32>,
    token: Buf<f32>,
    n: usize,
    d: usize,
) -> Result<()> {
    gpu.launch(
        "mask_tokens_forward",
        &[x.into(), mask.into(), token.into(), u(n), u(d)],
    )
}

/// The masked rows of `dx` are added into `dtoken` and become 0.
pub fn mask_tokens_backward<D: Device>(
    gpu: &mut Gpu<D>,
    dx: Buf<f32>,
    dtoken: Buf<f32>,
    mask: Buf<f32>,
    n: usize,
    d: usize,
) -> Result<()> {
    gpu.launch(
        "mask_tokens_backward",
        &[dx.into(), dtoken.into(), mask.into(), u(n), u(d)],
    )
}

/// `out[i] = src[idx[i]]` for `n` rows of `d` (zeros where `idx[i] >= src_rows`).
pub fn gather_rows<D: Device>(
    gpu: &mut Gpu<D>,
    out: Buf<f32>,
    src: Buf<f32>,
    idx: Buf<u64>,
    (n, d, src_rows): (usize, usize, usize),
) -> Result<()> {
    gpu.launch(
        "gather_rows",
        &[out.into(), src.into(), idx.into(), u(n), u(d), u(src_rows)],
    )
}

/// The patch loss at `m` masked student rows against the teacher rows `tgt[i]` of
/// `p_t[t_rows, k]`, row weights `w`: `dots` become `dL/d dots` (scaled by `grad_scale`),
/// `dL/dr` is added into `dr` (when given), loss partials into `loss_part`.
#[derive(Clone, Copy, Debug)]
pub struct XentMasked {
    pub dots: Buf<f32>,
    pub dr: Option<Buf<f32>>,
    pub loss_part: Buf<f32>,
    pub lse: Buf<f32>,
    pub p_t: Buf<f32>,
    pub tgt: Buf<u64>,
    pub w: Buf<f32>,
    pub terms: LogitTerms,
    pub tau: f32,
    pub grad_scale: f32,
    pub m: usize,
    pub k: usize,
    pub t_rows: usize,
}

pub fn xent_masked<D: Device>(gpu: &mut Gpu<D>, a: &XentMasked) -> Result<()> {
    gpu.launch(
        "xent_masked",
        &[
            a.dots.into(),
            a.dr.map_or(Arg::Null, Arg::from),
            a.loss_part.into(),
            a.lse.into(),
            a.p_t.into(),
            a.tgt.into(),
            a.w.into(),
            a.terms.scale.into(),
            a.terms.bias.into(),
            a.terms.dbias.into(),
            a.tau.into(),
            a.grad_scale.into(),
            u(a.m),
            u(a.k),
            u(a.t_rows),
        ],
    )
}
