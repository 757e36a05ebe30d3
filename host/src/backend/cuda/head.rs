//! The DINO head's MLP on the device (the CPU backend's `cpu/head.rs`): one GEMM per linear
//! over all rows, bias + GELU fused.
use anyhow::Result;

use super::device::{Buf, Device, Gpu};
use super::vit::Cx;

/// The head MLP's activations for `cap` rows.
pub struct HeadBufs {
    pre: Vec<Buf<f32>>,
    act: Vec<Buf<f32>>,
}

impl HeadBufs {
    pub fn new<D: Device>(gpu: &mut Gpu<D>, cx: &Cx, cap: usize) -> Result<Self> {
        let h = &cx.cfg.head;
        let mut pre = Vec::new();
        let mut act = Vec::new();
        for l in 0..h.n_layers {
            let w = h.layer_dims(cx.d, l).1;
            pre.push(gpu.alloc(cap * w)?);
            if l + 1 < h.n_layers {
                act.push(gpu.alloc(cap * w)?);
            }
        }
        Ok(Self { pre, act })
    }
    /// The bottleneck output `z[cap, p]`.
    pub fn z(&self) -> Buf<f32> {
        *self.pre.last().expect("the head has layers")
    }
}

/// Widest activation of the head.
pub fn head_width(cx: &Cx) -> usize {
    let h = &cx.cfg.head;
    (0..h.n_layers)
        .map(|l| {
            let (a, b) = h.layer_dims(cx.d, l);
            a.max(b)
        })
        .max()
        .unwrap_or(0)
}

/// `z = MLP(x)` for `x[rows, d]`.
pub fn head_forward<D: Device>(
    gpu: &mut Gpu<D>,
    cx: &Cx,
    p: Buf<f32>,
    hb: &HeadBufs,
    x: Buf<f32>,
    rows: usize,
) -> Result<()> {
    let nl = cx.cfg.head.n_layers;
    for l in 0..nl {
        let hl = cx.lay.head_layer(l);
        let input = if l == 0 { x } else { hb.act[l - 1] };
        gpu.linear(
            hb.pre[l],
            input,
            p.sub(hl.w, hl.d_out * hl.d_in),
            Some(p.sub(hl.b, hl.d_out)),
            rows,
            hl.d_in,
            hl.d_out,
        )?;
        if l + 1 < nl {
            gpu.gelu_forward(hb.act[l], hb.pre[l], rows * hl.d_out)?;
        }
    }
    Ok(())
}

/// Backward of [`head_forward`] from `dz[rows, p]`: head gradients ACCUMULATE into `grads`,
/// `dx[rows, d]` is written; `s0`, `s1` are scratch of `rows * head_width`.
#[allow(clippy::too_many_arguments)]
pub fn head_backward<D: Device>(
    gpu: &mut Gpu<D>,
    cx: &Cx,
    p: Buf<f32>,
    grads: Buf<f32>,
    hb: &HeadBufs,
    x: Buf<f32>,
    dz: Buf<f32>,
    dx: Buf<f32>,
    rows: usize,
    s0: Buf<f32>,
    s1: Buf<f32>,
) -> Result<()> {
    let nl = cx.cfg.head.n_layers;
    let mut cur = dz;
    for l in (0..nl).rev() {
        let hl = cx.lay.head_layer(l);
        let input = if l == 0 { x } else { hb.act[l - 1] };
        gpu.column_sum(grads.sub(hl.b, hl.d_out), cur, rows, hl.d_out, true)?;
        gpu.matmul_tn_acc(
            grads.sub(hl.w, hl.d_out * hl.d_in),
            cur,
            input,
            hl.d_out,
            hl.d_in,
            rows,
        )?;
        let w = p.sub(hl.w, hl.d_out * hl.d_in);
        if l > 0 {
            let s1v = s1.sub(0, rows * hl.d_in);
            gpu.matmul_nn(s1v, cur, w, rows, hl.d_in, hl.d_out)?;
            let s0v = s0.sub(0, rows * hl.d_in);
            gpu.gelu_backward(s0v, hb.pre[l - 1], s1v, rows * hl.d_in)?;
            cur = s0v;
        } else {
            gpu.matmul_nn(dx, cur, w, rows, hl.d_in, hl.d_out)?;
        }
    }
    Ok(())
}
