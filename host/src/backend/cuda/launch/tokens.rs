//! Launchers of `ptx/src/kernels/tokens.rs`: patch extraction, the token sequence and its
//! backward, the resized position embedding.
use anyhow::Result;

use crate::backend::cuda::device::{u32_of as u, Buf, Device, Gpu};

/// Images `[n, c, h, w]` cut into patches `[n, (h/p)(w/p), c p p]`.
#[derive(Clone, Copy, Debug)]
pub struct ImageDims {
    pub n: usize,
    pub chans: usize,
    pub h: usize,
    pub w: usize,
    pub patch: usize,
}

pub fn patchify<D: Device>(
    gpu: &mut Gpu<D>,
    patches: Buf<f32>,
    img: Buf<f32>,
    d: ImageDims,
) -> Result<()> {
    gpu.launch(
        "patchify",
        &[
            patches.into(),
            img.into(),
            u(d.n),
            u(d.chans),
            u(d.h),
            u(d.w),
            u(d.patch),
        ],
    )
}

/// Tokens `x[n, np + 1, d]`: `[CLS]` then the patch embeddings, plus the position embedding.
#[allow(clippy::too_many_arguments)]
pub fn tokens_forward<D: Device>(
    gpu: &mut Gpu<D>,
    x: Buf<f32>,
    patch: Buf<f32>,
    cls: Buf<f32>,
    pos: Buf<f32>,
    (n, np, d): (usize, usize, usize),
) -> Result<()> {
    gpu.launch(
        "tokens_forward",
        &[
            x.into(),
            patch.into(),
            cls.into(),
            pos.into(),
            u(n),
            u(np),
            u(d),
        ],
    )
}

/// The patch rows of the token gradient `dx[n, np + 1, d]` into `dpatch[n, np, d]`.
pub fn tokens_backward_patch<D: Device>(
    gpu: &mut Gpu<D>,
    dpatch: Buf<f32>,
    dx: Buf<f32>,
    (n, np, d): (usize, usize, usize),
) -> Result<()> {
    gpu.launch(
        "tokens_backward_patch",
        &[dpatch.into(), dx.into(), u(n), u(np), u(d)],
    )
}

/// `dcls` and `dpos` (added) from the token gradient, summed over the images.
pub fn tokens_backward_params<D: Device>(
    gpu: &mut Gpu<D>,
    dcls: Buf<f32>,
    dpos: Buf<f32>,
    dx: Buf<f32>,
    (n, np, d): (usize, usize, usize),
) -> Result<()> {
    gpu.launch(
        "tokens_backward_params",
        &[dcls.into(), dpos.into(), dx.into(), u(n), u(np), u(d)],
    )
}

/// A `[src_h, src_w, d]` grid of position embeddings resized (bilinear) to `[dst_h, dst_w, d]`.
#[derive(Clone, Copy, Debug)]
pub struct ResizeDims {
    pub src_h: usize,
    pub src_w: usize,
    pub dst_h: usize,
    pub dst_w: usize,
    pub d: usize,
}

impl ResizeDims {
    fn args(&self) -> [crate::backend::cuda::device::Arg; 5] {
        [
            u(self.src_h),
            u(self.src_w),
            u(self.dst_h),
            u(self.dst_w),
            u(self.d),
        ]
    }
}

pub fn pos_resize_forward<D: Device>(
    gpu: &mut Gpu<D>,
    dst: Buf<f32>,
    src: Buf<f32>,
    r: ResizeDims,
) -> Result<()> {
    let mut args = vec![dst.into(), src.into()];
    args.extend(r.args());
    gpu.launch("pos_resize_forward", &args)
}

/// The resize's backward: `dsrc` (added) from `ddst`.
pub fn pos_resize_backward<D: Device>(
    gpu: &mut Gpu<D>,
    dsrc: Buf<f32>,
    ddst: Buf<f32>,
    r: ResizeDims,
) -> Result<()> {
    let mut args = vec![dsrc.into(), ddst.into()];
    args.extend(r.args());
    gpu.launch("pos_resize_backward", &args)
}
