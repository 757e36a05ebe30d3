//! The DINO head's MLP (`[CLS]` -> hidden -> ... -> bottleneck `z`) on all rows at once.
use dinovmf_core::model::HeadConfig;

use super::gemm::{linear_matmul, Op};
use super::rows;
use super::vit::Cx;

/// Pre-activations of every head linear and the GELU outputs between them, `cap` rows.
pub struct HeadBufs {
    pub pre: Vec<Vec<f32>>,
    pub act: Vec<Vec<f32>>,
    /// GELU derivatives of the hidden layers.
    pub dact: Vec<Vec<f32>>,
}

impl HeadBufs {
    pub fn new(cx: &Cx, cap: usize) -> Self {
        let h: &HeadConfig = &cx.cfg.head;
        let nl = h.n_layers;
        let pre = (0..nl)
            .map(|l| vec![0.0; cap * h.layer_dims(cx.d, l).1])
            .collect();
        let hidden = || {
            (0..nl.saturating_sub(1))
                .map(|l| vec![0.0; cap * h.layer_dims(cx.d, l).1])
                .collect()
        };
        Self {
            pre,
            act: hidden(),
            dact: hidden(),
        }
    }

    /// The bottleneck output `z[rows, p]`.
    pub fn z(&self) -> &[f32] {
        self.pre.last().map_or(&[][..], |v| &v[..])
    }
}

/// Widest activation of the head (for backward scratch).
pub fn max_width(cx: &Cx) -> usize {
    let h = &cx.cfg.head;
    (0..h.n_layers)
        .map(|l| {
            let (a, b) = h.layer_dims(cx.d, l);
            a.max(b)
        })
        .max()
        .unwrap_or(0)
}

/// `z = MLP(x)` for `x[rows, d]`; `save` keeps the GELU derivatives for [`backward`].
pub fn forward(cx: &Cx, p: &[f32], hb: &mut HeadBufs, x: &[f32], rows: usize, save: bool) {
    let nl = cx.cfg.head.n_layers;
    for l in 0..nl {
        let hl = cx.lay.head_layer(l);
        let (pre, act, dact) = (&mut hb.pre, &mut hb.act, &mut hb.dact);
        let input: &[f32] = if l == 0 { x } else { &act[l - 1] };
        let w = &p[hl.w..hl.w + hl.d_out * hl.d_in];
        let b = &p[hl.b..hl.b + hl.d_out];
        if l + 1 < nl {
            linear_matmul(
                cx.prec,
                rows,
                hl.d_out,
                hl.d_in,
                input,
                Op::N,
                w,
                Op::T,
                &mut pre[l],
                false,
            );
            let dg = if save { Some(&mut dact[l][..]) } else { None };
            rows::bias_gelu(&mut pre[l], &mut act[l], dg, b, rows);
        } else {
            rows::fill_rows(&mut pre[l], b, rows);
            linear_matmul(
                cx.prec,
                rows,
                hl.d_out,
                hl.d_in,
                input,
                Op::N,
                w,
                Op::T,
                &mut pre[l],
                true,
            );
        }
    }
}

/// Backward from `dz[rows, p]`: head gradients ACCUMULATE into `grads`, `dx[rows, d]` is
/// written. `s0`, `s1` are scratch of `rows * max_width` each; `partials` as
/// [`rows::colsum_add`] needs.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    cx: &Cx,
    p: &[f32],
    grads: &mut [f32],
    hb: &HeadBufs,
    x: &[f32],
    dz: &[f32],
    dx: &mut [f32],
    rows: usize,
    s0: &mut Vec<f32>,
    s1: &mut Vec<f32>,
    partials: &mut [f32],
) {
    let nl = cx.cfg.head.n_layers;
    let pdim = cx.cfg.head.bottleneck;
    s0[..rows * pdim].copy_from_slice(&dz[..rows * pdim]);
    for l in (0..nl).rev() {
        let hl = cx.lay.head_layer(l);
        let input: &[f32] = if l == 0 { x } else { &hb.act[l - 1] };
        rows::colsum_add(
            &mut grads[hl.b..hl.b + hl.d_out],
            s0,
            rows,
            hl.d_out,
            partials,
        );
        linear_matmul(
            cx.prec,
            hl.d_out,
            hl.d_in,
            rows,
            s0,
            Op::T,
            input,
            Op::N,
            &mut grads[hl.w..hl.w + hl.d_out * hl.d_in],
            true,
        );
        let w = &p[hl.w..hl.w + hl.d_out * hl.d_in];
        if l > 0 {
            linear_matmul(
                cx.prec,
                rows,
                hl.d_in,
                hl.d_out,
                s0,
                Op::N,
                w,
                Op::N,
                s1,
                false,
            );
            rows::mul_inplace(s1, &hb.dact[l - 1], rows * hl.d_in);
            core::mem::swap(s0, s1);
        } else {
            linear_matmul(
                cx.prec,
                rows,
                hl.d_in,
                hl.d_out,
                s0,
                Op::N,
                w,
                Op::N,
                dx,
                false,
            );
        }
    }
}
