//! iBOT's patch loss (L_mim) on GEMMs, the CPU counterpart of core's
//! `mim_loss::mim_loss_forward_backward` (which the tests hold it to).
//!
//! The teacher side runs on every patch token of the two global crops (the patch center is a
//! mean over all of them); the student side only on the masked positions, gathered into
//! `z_s[M, p]` in row order. Per-prototype sums (center statistic, `dL/dg`) use a fixed
//! partition of the rows: deterministic.
use rayon::prelude::*;

use dinovmf_core::centering::{add_row_mean, center_update, Centering};
use dinovmf_core::logits::{branch_terms_forward, logits_row_backward, NORMALIZE_EPS};
use dinovmf_core::loss::LossConfig;
use dinovmf_core::mim_loss::mim_row_weight;
use dinovmf_core::ops::{l2norm_row_backward, l2norm_row_inplace};

use super::gemm::{matmul, Op};
use super::loss_rows::{teacher_row, teacher_shifts, xent_row};
use super::sinkhorn::sinkhorn_targets_over_ranks;
use crate::backend::reduce::{Collective, SinkhornOver};

const NORM_EPS: f32 = NORMALIZE_EPS as f32;
const CHUNK: usize = 32;

/// Scratch for `rows` teacher patch rows (and at most as many masked student rows).
pub struct MimBufs {
    pub k: usize,
    pub p: usize,
    mu_s: Vec<f32>,
    mu_t: Vec<f32>,
    vn_s: Vec<f32>,
    vn_t: Vec<f32>,
    r: Vec<f32>,
    scale_s: Vec<f32>,
    bias_s: Vec<f32>,
    dbias_s: Vec<f32>,
    scale_t: Vec<f32>,
    bias_t: Vec<f32>,
    dbias_t: Vec<f32>,
    y: Vec<f32>,
    zn: Vec<f32>,
    /// Teacher logits, then targets `[rows, K]`.
    l_t: Vec<f32>,
    p_t: Vec<f32>,
    /// Student dots, logits, and dL/d(dots) `[M, K]`.
    dots_s: Vec<f32>,
    l_s: Vec<f32>,
    ddots: Vec<f32>,
    part: Vec<f32>,
    /// Sinkhorn-Knopp's per-prototype scratch.
    col_max: Vec<f32>,
    col_sum: Vec<f32>,
    row_loss: Vec<f32>,
    row_ent: Vec<f32>,
    dy: Vec<f32>,
    dmu: Vec<f32>,
    dv_tmp: Vec<f32>,
    pub(super) stat: Vec<f32>,
    shift: Vec<f32>,
    /// dL/dz of the masked student rows `[M, p]` (already scaled by the MIM weight).
    pub dz: Vec<f32>,
}

impl MimBufs {
    pub fn new(rows: usize, k: usize, p: usize) -> Self {
        let z = |n: usize| vec![0.0f32; n];
        Self {
            k,
            p,
            mu_s: z(k * p),
            mu_t: z(k * p),
            vn_s: z(k),
            vn_t: z(k),
            r: z(k),
            scale_s: z(k),
            bias_s: z(k),
            dbias_s: z(k),
            scale_t: z(k),
            bias_t: z(k),
            dbias_t: z(k),
            y: z(rows * p),
            zn: z(rows),
            l_t: z(rows * k),
            p_t: z(rows * k),
            dots_s: z(rows * k),
            l_s: z(rows * k),
            ddots: z(rows * k),
            part: z(rows.div_ceil(CHUNK) * k),
            col_max: z(k),
            col_sum: z(k),
            row_loss: z(rows),
            row_ent: z(rows),
            dy: z(rows * p),
            dmu: z(k * p),
            dv_tmp: z(k * p),
            stat: z(k),
            shift: z(k),
            dz: z(rows * p),
        }
    }
}

/// What the patch loss reports.
#[derive(Clone, Copy, Debug, Default)]
pub struct MimReport {
    /// L_mim, unweighted.
    pub loss: f32,
    /// Mean entropy of the teacher's patch targets.
    pub teacher_entropy: f32,
}

/// Sinkhorn-Knopp targets over every teacher patch row of the batch (the logits
/// `scale dots + bias` in parallel, then core's balancing in place in `p_t`), the statistic
/// (the targets' mean over this rank's rows) and the row entropies. The balancing is over
/// every rank's patch rows.
fn sinkhorn_patch_targets(
    mb: &mut MimBufs,
    rows: usize,
    iters: u32,
    ranks: &mut dyn Collective,
) -> anyhow::Result<()> {
    let k = mb.k;
    let (scale, bias) = (&mb.scale_t, &mb.bias_t);
    mb.p_t[..rows * k]
        .par_chunks_mut(k)
        .zip(mb.l_t[..rows * k].par_chunks(k))
        .for_each(|(pt, dots)| {
            for (((x, &d), &s), &b) in pt.iter_mut().zip(dots).zip(scale).zip(bias) {
                *x = s * d + b;
            }
        });
    sinkhorn_targets_over_ranks(
        &mut mb.p_t[..rows * k],
        &mut mb.col_max,
        &mut mb.col_sum,
        &mut mb.row_ent[..rows],
        rows,
        k,
        iters,
        &mut SinkhornOver(ranks),
    )?;
    mb.stat.fill(0.0);
    add_row_mean(&mut mb.stat, &mb.p_t, rows, k);
    Ok(())
}

fn normalize_rows(out: &mut [f32], norms: &mut [f32], x: &[f32], p: usize) {
    out.par_chunks_mut(p)
        .zip(norms.par_iter_mut())
        .zip(x.par_chunks(p))
        .for_each(|((o, n), x)| {
            o.copy_from_slice(x);
            *n = l2norm_row_inplace(o, NORM_EPS);
        });
}

/// The inputs of one call.
pub struct MimInputs<'a> {
    /// Teacher patch outputs `[rows, p]` (rows `(v, b, j)` view-major).
    pub z_t: &'a [f32],
    /// Student outputs at the masked positions `[M, p]`, and each one's row in `0..rows`.
    pub z_s: &'a [f32],
    pub masked_rows: &'a [usize],
    /// Masked count of each image `[views * batch]`; `n` patches per image.
    pub counts: &'a [usize],
    pub n: usize,
    pub views: usize,
    pub batch: usize,
    pub v_s: &'a [f32],
    pub g_s: &'a [f32],
    pub v_t: &'a [f32],
    pub g_t: &'a [f32],
}

/// Forward and backward of L_mim: writes `mb.dz[M, p]` and ADDS into `dv[K, p]` and `dg[K]`
/// (`dg` untouched with `norm_last_layer`); gradients are scaled by `weight` (the loss is
/// reported unweighted). `cfg` carries the patch teacher temperature and center momentum;
/// the new patch center goes to `next_center`. `ranks`: the data-parallel ranks whose patch
/// rows form the batch with these (Sinkhorn-Knopp balances over all of them).
#[allow(clippy::too_many_arguments)]
pub fn forward_backward(
    cfg: &LossConfig,
    mb: &mut MimBufs,
    ranks: &mut dyn Collective,
    inp: &MimInputs<'_>,
    weight: f32,
    center: &[f32],
    next_center: &mut [f32],
    dv: &mut [f32],
    dg: &mut [f32],
) -> anyhow::Result<MimReport> {
    let (k, p) = (mb.k, mb.p);
    let rows = inp.views * inp.batch * inp.n;
    let m = inp.masked_rows.len();
    let norm_last = cfg.norm_last_layer;
    let tau_s = cfg.student_temp as f32;
    let tau_t = cfg.teacher_temp as f32;

    // Teacher: targets at every patch with the previous center, and the center statistic.
    normalize_rows(&mut mb.mu_t, &mut mb.vn_t, &inp.v_t[..k * p], p);
    if norm_last {
        mb.r.fill(1.0);
    } else {
        mb.r.copy_from_slice(&inp.g_t[..k]);
    }
    branch_terms_forward(
        &mut mb.scale_t,
        &mut mb.bias_t,
        &mut mb.dbias_t,
        &mb.r,
        tau_t,
        p,
        cfg.kind,
        cfg.approx,
    );
    normalize_rows(
        &mut mb.y[..rows * p],
        &mut mb.zn[..rows],
        &inp.z_t[..rows * p],
        p,
    );
    matmul(
        rows,
        k,
        p,
        &mb.y,
        Op::N,
        &mb.mu_t,
        Op::T,
        &mut mb.l_t,
        false,
    );
    let nc = rows.div_ceil(CHUNK);
    teacher_shifts(&mut mb.shift, &center[..k], tau_t, cfg.centering);
    if let Centering::Sinkhorn { iters } = cfg.centering {
        sinkhorn_patch_targets(mb, rows, iters, ranks)?;
    } else {
        let w_t = 1.0 / rows as f32;
        let (scale, bias, shift) = (&mb.scale_t, &mb.bias_t, &mb.shift);
        mb.part[..nc * k]
            .par_chunks_mut(k)
            .zip(mb.l_t[..rows * k].par_chunks_mut(CHUNK * k))
            .zip(mb.p_t[..rows * k].par_chunks_mut(CHUNK * k))
            .zip(mb.row_ent[..rows].par_chunks_mut(CHUNK))
            .for_each(|(((part, l), pt), ent)| {
                part.fill(0.0);
                for ((l, pt), e) in l
                    .chunks_exact_mut(k)
                    .zip(pt.chunks_exact_mut(k))
                    .zip(ent.iter_mut())
                {
                    for ((x, &s), &b) in l.iter_mut().zip(scale).zip(bias) {
                        *x = s * *x + b;
                    }
                    *e = teacher_row(pt, part, l, shift, tau_t, cfg.centering, w_t);
                }
            });
        mb.stat.fill(0.0);
        for part in mb.part[..nc * k].chunks_exact(k) {
            for (s, &x) in mb.stat.iter_mut().zip(part) {
                *s += x;
            }
        }
    }
    let teacher_entropy = mb.row_ent[..rows].iter().fold(0.0f32, |a, &h| a + h) / rows as f32;
    next_center[..k].copy_from_slice(&center[..k]);
    center_update(next_center, &mb.stat, cfg.center_momentum as f32);
    if m == 0 {
        return Ok(MimReport {
            loss: 0.0,
            teacher_entropy,
        });
    }

    // Student at the masked positions.
    normalize_rows(&mut mb.mu_s, &mut mb.vn_s, &inp.v_s[..k * p], p);
    if norm_last {
        mb.r.fill(1.0);
    } else {
        mb.r.copy_from_slice(&inp.g_s[..k]);
    }
    branch_terms_forward(
        &mut mb.scale_s,
        &mut mb.bias_s,
        &mut mb.dbias_s,
        &mb.r,
        tau_s,
        p,
        cfg.kind,
        cfg.approx,
    );
    normalize_rows(&mut mb.y[..m * p], &mut mb.zn[..m], &inp.z_s[..m * p], p);
    matmul(
        m,
        k,
        p,
        &mb.y,
        Op::N,
        &mb.mu_s,
        Op::T,
        &mut mb.dots_s,
        false,
    );
    let ncs = m.div_ceil(CHUNK);
    {
        let (scale, bias, dbias) = (&mb.scale_s, &mb.bias_s, &mb.dbias_s);
        let p_t = &mb.p_t;
        let (views, batch, n) = (inp.views, inp.batch, inp.n);
        let (rows_of, counts) = (inp.masked_rows, inp.counts);
        mb.part[..ncs * k]
            .par_chunks_mut(k)
            .zip(mb.dots_s[..m * k].par_chunks(CHUNK * k))
            .zip(mb.l_s[..m * k].par_chunks_mut(CHUNK * k))
            .zip(mb.ddots[..m * k].par_chunks_mut(CHUNK * k))
            .zip(mb.row_loss[..m].par_chunks_mut(CHUNK))
            .enumerate()
            .for_each(|(c, ((((part, dots), l), dd), rl))| {
                part.fill(0.0);
                for (j, (((dots, l), dd), rl)) in dots
                    .chunks_exact(k)
                    .zip(l.chunks_exact_mut(k))
                    .zip(dd.chunks_exact_mut(k))
                    .zip(rl.iter_mut())
                    .enumerate()
                {
                    let row = rows_of[c * CHUNK + j];
                    let w = mim_row_weight(counts[row / n], views, batch) as f32;
                    // `dd` holds the target, then dL/d(dots); `l` the logits, then dL/dl.
                    dd.copy_from_slice(&p_t[row * k..(row + 1) * k]);
                    for (((x, &d), &s), &bb) in l.iter_mut().zip(dots).zip(scale).zip(bias) {
                        *x = s * d + bb;
                    }
                    *rl = w * xent_row(l, dd, 1.0, w * weight);
                    logits_row_backward(
                        dd,
                        if norm_last { None } else { Some(&mut part[..]) },
                        l,
                        dots,
                        scale,
                        dbias,
                        tau_s,
                    );
                }
            });
        if !norm_last {
            for part in mb.part[..ncs * k].chunks_exact(k) {
                for (s, &x) in dg[..k].iter_mut().zip(part) {
                    *s += x;
                }
            }
        }
    }
    let loss = mb.row_loss[..m].iter().fold(0.0f32, |a, &x| a + x);

    matmul(
        m,
        p,
        k,
        &mb.ddots,
        Op::N,
        &mb.mu_s,
        Op::N,
        &mut mb.dy,
        false,
    );
    matmul(k, p, m, &mb.ddots, Op::T, &mb.y, Op::N, &mut mb.dmu, false);
    {
        let (dy, y, zn) = (&mb.dy, &mb.y, &mb.zn);
        mb.dz[..m * p]
            .par_chunks_mut(p)
            .enumerate()
            .for_each(|(i, o)| {
                l2norm_row_backward(
                    o,
                    &dy[i * p..(i + 1) * p],
                    &y[i * p..(i + 1) * p],
                    zn[i],
                    NORM_EPS,
                )
            });
        let (dmu, mu, vn) = (&mb.dmu, &mb.mu_s, &mb.vn_s);
        mb.dv_tmp.par_chunks_mut(p).enumerate().for_each(|(i, o)| {
            l2norm_row_backward(
                o,
                &dmu[i * p..(i + 1) * p],
                &mu[i * p..(i + 1) * p],
                vn[i],
                NORM_EPS,
            )
        });
        dv[..k * p]
            .par_iter_mut()
            .zip(mb.dv_tmp.par_iter())
            .for_each(|(a, &b)| *a += b);
    }
    Ok(MimReport {
        loss,
        teacher_entropy,
    })
}
