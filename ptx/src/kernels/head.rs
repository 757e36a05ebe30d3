//! The head's output math on the GPU: per-prototype vMF/DINO terms, teacher targets with
//! centering, the fused multi-crop cross-entropy and the center update.
//!
//! Student chain: `l2norm_forward` (z -> y, v -> mu) -> [`branch_terms`] -> `gemm_logits`
//! (dots + per-tile LSE) -> [`lse_combine`] -> [`xent_columns`] (loss partials, dL/d(dots) in
//! place of the dots, dL/dr) -> GEMMs `dy = ddots mu`, `dmu = ddots^T y` -> `l2norm_backward`.
//! Teacher: `gemm` "nt" (dots) -> [`teacher_targets`] -> [`teacher_stat`]; after the loss,
//! [`center_update`].
use super::for_each_elem;
use crate::block::{block_reduce, block_reduce_lse, Block, Lse, Op};
use crate::math as m;
use dinovmf_core::centering::{self, Centering};
use dinovmf_core::logits::{self, LogitKind};
use dinovmf_core::vmf::BesselApprox;

/// `scale[k]`, `bias[k]`, `dbias_dr[k]` of one branch from the radii `r[k]`: one thread per
/// prototype, each calling `core::logits::branch_terms_forward` (and so `core::vmf`) on its own
/// element.
#[allow(clippy::too_many_arguments)]
pub fn branch_terms<B: Block>(
    b: &mut B,
    scale: &mut [f32],
    bias: &mut [f32],
    dbias_dr: &mut [f32],
    r: &[f32],
    k: usize,
    tau: f32,
    p: usize,
    kind: LogitKind,
    approx: BesselApprox,
) {
    for_each_elem(b, k, |i| {
        logits::branch_terms_forward(
            &mut scale[i..i + 1],
            &mut bias[i..i + 1],
            &mut dbias_dr[i..i + 1],
            &r[i..i + 1],
            tau,
            p,
            kind,
            approx,
        )
    });
}

/// Row log-sum-exps `lse[m]` from the per-tile states of `gemm_logits`; one block of
/// [`WIDE_BLOCK`](super::WIDE_BLOCK) per row.
pub fn lse_combine<B: Block>(
    b: &mut B,
    lse: &mut [f32],
    lse_part: &[f32],
    m: usize,
    ntiles: usize,
) {
    let row = b.dims().bid[0] as usize;
    let bdim = b.dims().bdim as usize;
    let mut l = b.local(Lse::EMPTY);
    b.each(&mut l, |t, st, _| {
        if row < m {
            let mut j = t as usize;
            while j < ntiles {
                let o = (row * ntiles + j) * 2;
                st.merge(Lse {
                    m: lse_part[o],
                    s: lse_part[o + 1],
                });
                j += bdim;
            }
        }
    });
    block_reduce_lse(b, &mut l, |st| st, 0);
    b.each(&mut l, |t, st, _| {
        if t == 0 && row < m {
            lse[row] = st.value();
        }
    });
}

#[derive(Clone, Copy)]
struct TwoLse {
    raw: Lse,
    sh: Lse,
}

/// Teacher targets, one block of [`WIDE_BLOCK`](super::WIDE_BLOCK) per teacher row:
/// `p_t = softmax(l - shift)` with `l = scale dots + bias` and the previous center
/// (`shift = c / tau_t` for logit centering, `ln max(c, 1e-30)` for probability centering);
/// also writes `lse_raw[row] = logsumexp(l)` for [`teacher_stat`].
#[allow(clippy::too_many_arguments)]
pub fn teacher_targets<B: Block>(
    b: &mut B,
    p_t: &mut [f32],
    lse_raw: &mut [f32],
    dots: &[f32],
    scale: &[f32],
    bias: &[f32],
    center: &[f32],
    tau_t: f32,
    centering: Centering,
    nt: usize,
    k: usize,
) {
    let row = b.dims().bid[0] as usize;
    let bdim = b.dims().bdim as usize;
    let inv_tau = 1.0 / tau_t;
    let mut l = b.local(TwoLse {
        raw: Lse::EMPTY,
        sh: Lse::EMPTY,
    });
    b.each(&mut l, |t, st, _| {
        if row < nt {
            let mut j = t as usize;
            while j < k {
                let x = scale[j] * dots[row * k + j] + bias[j];
                st.raw.push(x);
                st.sh
                    .push(x - centering::teacher_shift(center[j], inv_tau, centering));
                j += bdim;
            }
        }
    });
    block_reduce_lse(b, &mut l, |st| &mut st.raw, 0);
    block_reduce_lse(b, &mut l, |st| &mut st.sh, 0);
    b.each(&mut l, |t, st, _| {
        if row < nt {
            let lse = st.sh.value();
            let mut j = t as usize;
            while j < k {
                let x = scale[j] * dots[row * k + j] + bias[j];
                p_t[row * k + j] =
                    m::exp(x - centering::teacher_shift(center[j], inv_tau, centering) - lse);
                j += bdim;
            }
            if t == 0 {
                lse_raw[row] = st.raw.value();
            }
        }
    });
}

/// The batch statistic of the center update, `stat[k] = mean_rows(tau_t l)` (logit centering)
/// or `mean_rows(softmax(l))` (probability centering); one thread per prototype, rows in order.
#[allow(clippy::too_many_arguments)]
pub fn teacher_stat<B: Block>(
    b: &mut B,
    stat: &mut [f32],
    dots: &[f32],
    scale: &[f32],
    bias: &[f32],
    lse_raw: &[f32],
    tau_t: f32,
    centering: Centering,
    nt: usize,
    k: usize,
) {
    let w = 1.0 / nt.max(1) as f32;
    for_each_elem(b, k, |j| {
        let mut acc = 0.0f32;
        for row in 0..nt {
            let x = scale[j] * dots[row * k + j] + bias[j];
            acc += w * match centering {
                Centering::Logit => tau_t * x,
                // Sinkhorn never reaches this kernel (`Centering::from_code` has no code for it).
                Centering::Probability | Centering::Sinkhorn { .. } => m::exp(x - lse_raw[row]),
            };
        }
        stat[j] = acc;
    });
}

#[derive(Clone, Copy, Default)]
struct LossAcc {
    loss: f32,
}

/// The multi-crop cross-entropy and its gradient, fused, over column slabs: one thread per
/// prototype `j` walks every student row `i = v B + b` (crop-major) and, with the row's `lse[i]`
/// from [`lse_combine`], reads `dots[i, j]` once and overwrites it with `dL/d dots[i, j]`:
/// `l = scale dots + bias`, `t = Σ_{q != v} p_t[q B + b, j]`, loss `+= t (lse - l)`,
/// `dl = (n_t e^{l - lse} - t) / (B pairs)`, `ddots = dl scale`, `dr[j] += Σ_i dl (dots / tau +
/// dbias_dr)` (when `dr` is given). Each block writes its loss sum to `loss_part[blockIdx.x]`
/// (unscaled: the loss is `Σ loss_part / (B pairs)`, see `reduce_final`).
#[allow(clippy::too_many_arguments)]
pub fn xent_columns<B: Block>(
    b: &mut B,
    dots: &mut [f32],
    mut dr: Option<&mut [f32]>,
    loss_part: &mut [f32],
    lse: &[f32],
    p_t: &[f32],
    scale: &[f32],
    bias: &[f32],
    dbias_dr: &[f32],
    tau: f32,
    n_crops: usize,
    batch: usize,
    k: usize,
) {
    let pairs = dinovmf_core::loss::n_pairs(n_crops);
    let gs = 1.0 / (batch * pairs).max(1) as f32;
    let inv_tau = 1.0 / tau;
    let base = b.dims().base_x();
    let mut l = b.local(LossAcc::default());
    b.each(&mut l, |t, st, _| {
        let j = base + t as usize;
        if j >= k {
            return;
        }
        let mut dr_acc = 0.0f32;
        for v in 0..n_crops {
            let nq = dinovmf_core::loss::n_teacher_views(v) as f32;
            for bi in 0..batch {
                let i = v * batch + bi;
                let mut tgt = 0.0f32;
                for q in 0..2 {
                    if q != v {
                        tgt += p_t[(q * batch + bi) * k + j];
                    }
                }
                let d = dots[i * k + j];
                let x = scale[j] * d + bias[j];
                let nls = lse[i] - x;
                st.loss += tgt * nls;
                let dl = (nq * m::exp(-nls) - tgt) * gs;
                dots[i * k + j] = dl * scale[j];
                dr_acc += dl * (d * inv_tau + dbias_dr[j]);
            }
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

/// Row entropies `ent[r] = -Σ_j p[r, j] ln p[r, j]` of `p[rows, k]` (terms with `p <= 0` add
/// nothing, as `core::collapse::entropy`); one block of [`WIDE_BLOCK`](super::WIDE_BLOCK) per
/// row. The teacher's collapse signals come from it without copying `P_t` to the host: the mean
/// row entropy (over the rows of `P_t`) and the entropy of the batch-mean distribution (one row).
pub fn row_entropy<B: Block>(b: &mut B, ent: &mut [f32], p: &[f32], rows: usize, k: usize) {
    let row = b.dims().bid[0] as usize;
    let bdim = b.dims().bdim as usize;
    let mut l = b.local(LossAcc::default());
    b.each(&mut l, |t, st, _| {
        if row < rows {
            let mut j = t as usize;
            while j < k {
                let x = p[row * k + j];
                if x > 0.0 {
                    st.loss -= x * m::ln(x);
                }
                j += bdim;
            }
        }
    });
    block_reduce(b, &mut l, Op::Sum, |st| &mut st.loss, 0);
    b.each(&mut l, |t, st, _| {
        if t == 0 && row < rows {
            ent[row] = st.loss;
        }
    });
}

/// `c <- m c + (1 - m) stat`, one thread per prototype calling `core::centering::center_update`.
pub fn center_update<B: Block>(
    b: &mut B,
    center: &mut [f32],
    stat: &[f32],
    momentum: f32,
    k: usize,
) {
    for_each_elem(b, k, |i| {
        centering::center_update(&mut center[i..i + 1], &stat[i..i + 1], momentum)
    });
}
