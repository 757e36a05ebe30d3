//! iBOT's kernels: the mask-token substitution on patch embeddings and its backward, a row
//! gather (the masked patch rows into the student head, the head's token gradients back onto
//! the token grid), and the patch loss's weighted cross-entropy over gathered rows.
//!
//! The patch loss reuses the `[CLS]` chain (`head.rs`): `teacher_targets` / `teacher_stat` /
//! `row_entropy` / `center_update` on every teacher patch row, `gemm_logits` + `lse_combine` on
//! the masked student rows, then [`xent_masked`] in place of `xent_columns`.
use super::for_each_elem;
use crate::block::{block_reduce, Block, Op};
use crate::math as m;
use dinovmf_core::ops;

/// `x_i <- (1 - m_i) x_i + m_i token` on patch embeddings `x[n, d]`; one thread per element,
/// each calling `core::ops::mask_tokens_forward` on its own element.
pub fn mask_tokens_forward<B: Block>(
    b: &mut B,
    x: &mut [f32],
    mask: &[f32],
    token: &[f32],
    n: usize,
    d: usize,
) {
    for_each_elem(b, n * d, |e| {
        let (r, c) = (e / d, e % d);
        ops::mask_tokens_forward(&mut x[e..e + 1], &mask[r..r + 1], &token[c..c + 1], 1, 1)
    });
}

/// Backward of [`mask_tokens_forward`]: `dtoken[c] += Σ_i m_i dx[i, c]` (rows in order, as
/// core) and `dx[i, c] <- (1 - m_i) dx[i, c]`; one thread per column.
pub fn mask_tokens_backward<B: Block>(
    b: &mut B,
    dx: &mut [f32],
    dtoken: &mut [f32],
    mask: &[f32],
    n: usize,
    d: usize,
) {
    for_each_elem(b, d, |c| {
        let mut acc = dtoken[c];
        for (i, &mi) in mask[..n].iter().enumerate() {
            if mi != 0.0 {
                let g = &mut dx[i * d + c];
                acc += mi * *g;
                *g *= 1.0 - mi;
            }
        }
        dtoken[c] = acc;
    });
}

/// `out[i, :] = src[idx[i], :]` for `i < n`, or zeros where `idx[i] >= src_rows` (rows that
/// receive nothing); one thread per output element. A pure gather, so both directions of a
/// row selection (and its inverse, with the sentinel) are deterministic.
pub fn gather_rows<B: Block>(
    b: &mut B,
    out: &mut [f32],
    src: &[f32],
    idx: &[u64],
    n: usize,
    d: usize,
    src_rows: usize,
) {
    for_each_elem(b, n * d, |e| {
        let (i, c) = (e / d, e % d);
        let r = idx[i];
        out[e] = if r < src_rows as u64 {
            src[r as usize * d + c]
        } else {
            0.0
        };
    });
}

#[derive(Clone, Copy, Default)]
struct Acc {
    loss: f32,
}

/// The patch loss's cross-entropy and its gradient over `m` gathered student rows, fused and
/// column-parallel like `xent_columns`: thread `j` walks the rows in order; row `i` has target
/// row `tgt[i]` of `p_t` and weight `w[i]` (`core::mim_loss::mim_row_weight`). With `l = scale
/// dots + bias`, `t = p_t[tgt[i], j]`: loss `+= w t (lse - l)` (as
/// `core::loss::xent_row_forward_backward_inplace` with one target), `dl = (e^{l - lse} - t) w
/// grad_scale`, `dots[i, j] <- dl scale` and `dr[j] += Σ_i dl (dots / tau + dbias_dr)` (when
/// `dr` is given, as `core::logits::logits_row_backward`). Block sums of the (unscaled by
/// `grad_scale`) loss go to `loss_part[blockIdx.x]`.
#[allow(clippy::too_many_arguments)]
pub fn xent_masked<B: Block>(
    b: &mut B,
    dots: &mut [f32],
    mut dr: Option<&mut [f32]>,
    loss_part: &mut [f32],
    lse: &[f32],
    p_t: &[f32],
    tgt: &[u64],
    w: &[f32],
    scale: &[f32],
    bias: &[f32],
    dbias_dr: &[f32],
    tau: f32,
    grad_scale: f32,
    m_rows: usize,
    k: usize,
) {
    let inv_tau = 1.0 / tau;
    let base = b.dims().base_x();
    let mut l = b.local(Acc::default());
    b.each(&mut l, |t, st, _| {
        let j = base + t as usize;
        if j >= k {
            return;
        }
        let mut dr_acc = 0.0f32;
        for i in 0..m_rows {
            let tv = p_t[tgt[i] as usize * k + j];
            let d = dots[i * k + j];
            let x = scale[j] * d + bias[j];
            let nls = lse[i] - x;
            st.loss += w[i] * (tv * nls);
            let dl = (m::exp(-nls) - tv) * (w[i] * grad_scale);
            dots[i * k + j] = dl * scale[j];
            dr_acc += dl * (d * inv_tau + dbias_dr[j]);
        }
        if let Some(dr) = dr.as_deref_mut() {
            dr[j] += dr_acc;
        }
    });
    block_reduce(b, &mut l, Op::Sum, |st| &mut st.loss, 0);
    let bx = b.dims().bid[0] as usize;
    b.each(&mut l, |t, st, _| {
        if t == 0 {
            loss_part[bx] = st.loss;
        }
    });
}
