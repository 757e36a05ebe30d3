//! Launchers of `ptx/src/kernels/reduce.rs` beyond `ops.rs`'s reductions: the clipping
//! coefficients and the per-segment scaling.
use anyhow::Result;

use crate::backend::cuda::device::{u32_of as u, Buf, Device, Gpu};
use crate::backend::cuda::ops::Segments;

/// Per-segment norms `sqrt(Σ part)` of `nseg` segments of `parts` partial sums of squares, and
/// the coefficients `min(1, clip / (norm + 1e-6))`.
pub fn clip_coef<D: Device>(
    gpu: &mut Gpu<D>,
    coef: Buf<f32>,
    norm: Buf<f32>,
    part: Buf<f32>,
    (parts, nseg): (usize, usize),
    clip: f64,
) -> Result<()> {
    gpu.launch(
        "clip_coef",
        &[
            coef.into(),
            norm.into(),
            part.into(),
            u(parts),
            u(nseg),
            clip.into(),
        ],
    )
}

/// Every segment of `x` scaled by its coefficient (segments with coefficient 1 untouched).
pub fn scale_segments<D: Device>(
    gpu: &mut Gpu<D>,
    x: Buf<f32>,
    segs: &Segments,
    coef: Buf<f32>,
) -> Result<()> {
    gpu.launch_with(
        "scale_segments",
        &[
            x.into(),
            u(x.len),
            segs.off.into(),
            segs.len.into(),
            coef.into(),
        ],
        &[
            ("nseg", segs.n as u64),
            ("max seg_len", segs.max_len as u64),
        ],
    )
}
