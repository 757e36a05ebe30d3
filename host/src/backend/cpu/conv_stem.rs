//! The convolutional stem on one group of same-size crops (core's `ops::conv_stem` and the
//! reference model's stem, with each convolution as one GEMM over every output pixel of the
//! group; im2col, col2im and the row passes parallel over images or rows).
//!
//! Maps are pixel-major (`[n, S S, C]`); the last map is the 1 x 1 patch embedding's input,
//! `[n, N, D]`, which the caller reads as its patch rows.
use rayon::prelude::*;

use dinovmf_core::model::StemLayer;
use dinovmf_core::ops::{chw_to_hwc, col2im3x3, conv3x3_out_side, im2col3x3};

use super::gemm::{linear_matmul, Op};
use super::rows;
use super::vit::Cx;

/// Saved activations of one stem convolution over a group.
pub struct StemLayerBufs {
    pub layer: StemLayer,
    /// Input side.
    pub side: usize,
    /// Output side.
    pub out_side: usize,
    /// im2col of the input `[cap, So So, C_in 9]`.
    pub cols: Vec<f32>,
    /// Pre-activation (bias included) and GELU output, `[cap, So So, C_out]`.
    pub pre: Vec<f32>,
    pub act: Vec<f32>,
    /// gelu'(pre), for the backward (empty in a group that keeps no activations).
    pub dgelu: Vec<f32>,
}

/// The stem's buffers of one group (empty without a stem).
pub struct StemBufs {
    /// The images, pixel-major `[cap, S S, C]`.
    pub hwc: Vec<f32>,
    pub layers: Vec<StemLayerBufs>,
}

impl StemBufs {
    /// For up to `cap` crops of side `size`; `saved`: the group runs backward (see `Group`).
    pub fn new(cx: &Cx, cap: usize, size: usize, saved: bool) -> Self {
        let v = &cx.cfg.vit;
        if v.stem_len() == 0 {
            return Self {
                hwc: Vec::new(),
                layers: Vec::new(),
            };
        }
        let mut side = size;
        let layers = (0..v.stem_len())
            .map(|i| {
                let layer = v.stem_layer(i);
                let out_side = conv3x3_out_side(side, layer.stride);
                let rows = cap * out_side * out_side;
                let b = StemLayerBufs {
                    layer,
                    side,
                    out_side,
                    cols: vec![0.0; rows * layer.col_len()],
                    pre: vec![0.0; rows * layer.c_out],
                    act: vec![0.0; rows * layer.c_out],
                    dgelu: vec![0.0; if saved { rows * layer.c_out } else { 0 }],
                };
                side = out_side;
                b
            })
            .collect();
        Self {
            hwc: vec![0.0; cap * v.in_chans * size * size],
            layers,
        }
    }
}

/// Backward scratch of the stem, sized for the largest group.
#[derive(Default)]
pub struct StemScratch {
    /// Gradient at a convolution's output (GELU output) and at its pre-activation.
    pub dact: Vec<f32>,
    pub dpre: Vec<f32>,
    pub dcols: Vec<f32>,
    pub partials: Vec<f32>,
}

impl StemScratch {
    /// For groups of `(images, side)`.
    pub fn new(cx: &Cx, groups: &[(usize, usize)]) -> Self {
        let v = &cx.cfg.vit;
        let mut s = Self::default();
        let grow = |buf: &mut Vec<f32>, n: usize| {
            if buf.len() < n {
                *buf = vec![0.0; n];
            }
        };
        for &(n, size) in groups {
            let mut side = size;
            for i in 0..v.stem_len() {
                let l = v.stem_layer(i);
                let so = conv3x3_out_side(side, l.stride);
                let rows = n * so * so;
                grow(&mut s.dact, rows * l.c_out);
                grow(&mut s.dact, n * side * side * l.c_in);
                grow(&mut s.dpre, rows * l.c_out);
                grow(&mut s.dcols, rows * l.col_len());
                grow(&mut s.partials, rows::n_chunks(rows) * l.c_out);
                side = so;
            }
        }
        s
    }
}

/// The stem's forward of `n` images `[n, C, size, size]` (CHW); the last map `[n, N, D]` is
/// written to `out` (the patch rows of the 1 x 1 patch embedding).
pub fn forward(cx: &Cx, p: &[f32], s: &mut StemBufs, images: &[f32], n: usize, out: &mut [f32]) {
    let v = &cx.cfg.vit;
    let c = v.in_chans;
    let Some(first) = s.layers.first() else {
        return;
    };
    let hw = first.side * first.side;
    s.hwc[..n * c * hw]
        .par_chunks_mut(c * hw)
        .zip(images[..n * c * hw].par_chunks(c * hw))
        .for_each(|(d, im)| chw_to_hwc(d, im, 1, c, hw));
    for i in 0..s.layers.len() {
        let (before, rest) = s.layers.split_at_mut(i);
        let lb = &mut rest[0];
        let input: &[f32] = match before.last() {
            Some(prev) => &prev.act,
            None => &s.hwc,
        };
        let l = lb.layer;
        let (side, so) = (lb.side, lb.out_side);
        let (in_len, k) = (side * side * l.c_in, l.col_len());
        lb.cols[..n * so * so * k]
            .par_chunks_mut(so * so * k)
            .zip(input[..n * in_len].par_chunks(in_len))
            .for_each(|(cols, x)| im2col3x3(cols, x, 1, l.c_in, side, l.stride));
        let (w_off, b_off) = cx.lay.stem_layer(i);
        let rows = n * so * so;
        linear_matmul(
            cx.prec,
            rows,
            l.c_out,
            k,
            &lb.cols,
            Op::N,
            &p[w_off..w_off + l.c_out * k],
            Op::T,
            &mut lb.pre,
            false,
        );
        let dgelu = (!lb.dgelu.is_empty()).then_some(&mut lb.dgelu[..]);
        rows::bias_gelu(
            &mut lb.pre,
            &mut lb.act,
            dgelu,
            &p[b_off..b_off + l.c_out],
            rows,
        );
    }
    let last = s.layers.last().expect("a stem has a layer");
    let len = n * last.out_side * last.out_side * last.layer.c_out;
    out[..len].copy_from_slice(&last.act[..len]);
}

/// Backward of [`forward`] from the gradient at the patch rows, which the caller leaves in
/// `sc.dact` (`[n, N, D]`), to the stem's weights and biases (ACCUMULATE into `grads`).
pub fn backward(
    cx: &Cx,
    p: &[f32],
    grads: &mut [f32],
    s: &StemBufs,
    n: usize,
    sc: &mut StemScratch,
) {
    for (i, lb) in s.layers.iter().enumerate().rev() {
        let l = lb.layer;
        let (side, so, k) = (lb.side, lb.out_side, l.col_len());
        let rows = n * so * so;
        let m = rows * l.c_out;
        sc.dpre[..m].copy_from_slice(&sc.dact[..m]);
        rows::mul_inplace(&mut sc.dpre, &lb.dgelu, m);
        let (w_off, b_off) = cx.lay.stem_layer(i);
        rows::colsum_add(
            &mut grads[b_off..b_off + l.c_out],
            &sc.dpre,
            rows,
            l.c_out,
            &mut sc.partials,
        );
        linear_matmul(
            cx.prec,
            l.c_out,
            k,
            rows,
            &sc.dpre,
            Op::T,
            &lb.cols,
            Op::N,
            &mut grads[w_off..w_off + l.c_out * k],
            true,
        );
        if i == 0 {
            break;
        }
        linear_matmul(
            cx.prec,
            rows,
            k,
            l.c_out,
            &sc.dpre,
            Op::N,
            &p[w_off..w_off + l.c_out * k],
            Op::N,
            &mut sc.dcols,
            false,
        );
        let in_len = side * side * l.c_in;
        sc.dact[..n * in_len]
            .par_chunks_mut(in_len)
            .zip(sc.dcols[..rows * k].par_chunks(so * so * k))
            .for_each(|(dx, dc)| col2im3x3(dx, dc, 1, l.c_in, side, l.stride));
    }
}
