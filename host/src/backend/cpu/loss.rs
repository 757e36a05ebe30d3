//! The DINO / DINO-vMF loss on GEMMs: `dots = Y M^T` for all rows at once, then the row
//! functions in parallel over rows (core's logits; the teacher targets and the multi-crop
//! cross-entropy from `loss_rows`, core's made fast), and the backward `dY = dDots M`,
//! `dM = dDots^T Y` as two more GEMMs.
//!
//! Per-prototype sums over rows (the center statistic, `dL/dg`) use a fixed partition of the
//! rows into chunks, each with its own partial buffer, added in chunk order: deterministic.
use rayon::prelude::*;

use dinovmf_core::centering::{add_row_mean, center_update, Centering};
use dinovmf_core::collapse::{collapse_stats_given_row_entropy, CollapseStats};
use dinovmf_core::logits::{branch_terms_forward, logits_row_backward};
use dinovmf_core::loss::{multicrop_target_sum, n_pairs, LossConfig};

use dinovmf_core::logits::NORMALIZE_EPS;
use dinovmf_core::ops::{l2norm_row_backward, l2norm_row_inplace};

use super::gemm::{matmul, Op};
use super::loss_rows::{teacher_row, teacher_shifts, xent_row};
use super::sinkhorn::sinkhorn_targets_over_ranks;
use crate::backend::reduce::{Collective, SinkhornOver};

const NORM_EPS: f32 = NORMALIZE_EPS as f32;

/// Rows per chunk of the loss's reductions (fewer rows, wider rows than the backbone's).
const LOSS_CHUNK: usize = 16;

/// Scratch of the loss for `n_crops` crops of `batch` images, `k` prototypes of dimension `p`.
pub struct LossBufs {
    pub n_crops: usize,
    pub batch: usize,
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
    y_s: Vec<f32>,
    zn_s: Vec<f32>,
    y_t: Vec<f32>,
    zn_t: Vec<f32>,
    dots_s: Vec<f32>,
    l_s: Vec<f32>,
    ddots: Vec<f32>,
    l_t: Vec<f32>,
    /// Teacher targets `P_t[2B, K]`.
    pub p_t: Vec<f32>,
    /// The batch statistic of the center update, `[K]`.
    pub stat: Vec<f32>,
    part: Vec<f32>,
    row_loss: Vec<f32>,
    row_ent: Vec<f32>,
    dy: Vec<f32>,
    dmu: Vec<f32>,
    /// `dL/dz_s[n_crops B, p]`.
    pub dz: Vec<f32>,
    /// The batch mean of the teacher targets `[K]` (the collapse signals' input).
    pub mean_p: Vec<f32>,
    /// Sinkhorn-Knopp's per-prototype scratch.
    col_max: Vec<f32>,
    col_sum: Vec<f32>,
    /// The center's per-prototype shift of the teacher's logits `[K]`.
    shift: Vec<f32>,
}

impl LossBufs {
    pub fn new(n_crops: usize, batch: usize, k: usize, p: usize) -> Self {
        let ns = n_crops * batch;
        let nt = 2 * batch;
        let z = |n: usize| vec![0.0f32; n];
        Self {
            n_crops,
            batch,
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
            y_s: z(ns * p),
            zn_s: z(ns),
            y_t: z(nt * p),
            zn_t: z(nt),
            dots_s: z(ns * k),
            l_s: z(ns * k),
            ddots: z(ns * k),
            l_t: z(nt * k),
            p_t: z(nt * k),
            stat: z(k),
            part: z(ns.div_ceil(LOSS_CHUNK).max(nt.div_ceil(LOSS_CHUNK)) * k),
            row_loss: z(ns),
            row_ent: z(nt),
            dy: z(ns * p),
            dmu: z(k * p),
            dz: z(ns * p),
            mean_p: z(k),
            col_max: z(k),
            col_sum: z(k),
            shift: z(k),
        }
    }
}

/// What the loss reports.
#[derive(Clone, Copy, Debug, Default)]
pub struct LossReport {
    pub loss: f32,
    pub collapse: CollapseStats<f32>,
}

/// `mu = v / ||v||` row-wise (parallel), `vn` the norms.
fn normalize_rows(mu: &mut [f32], vn: &mut [f32], v: &[f32], p: usize) {
    mu.par_chunks_mut(p)
        .zip(vn.par_iter_mut())
        .zip(v.par_chunks(p))
        .for_each(|((m, n), v)| {
            m.copy_from_slice(v);
            *n = l2norm_row_inplace(m, NORM_EPS);
        });
}

/// Forward and backward of the multi-crop loss. `v_*`/`g_*` are the prototype layers of the
/// two networks (`g` ignored with `norm_last_layer`), `z_s[n_crops B, p]`, `z_t[2B, p]`.
/// Writes `lb.dz`, `dv[K, p]`, and `dg[K]` (untouched with `norm_last_layer`); writes the
/// updated center into `next_center` (the old one is read from `center`). `ranks` are the
/// data-parallel ranks whose rows form the batch with these (Sinkhorn-Knopp balances over all
/// of them; every other statistic is reduced after the step, in the reduce phase).
#[allow(clippy::too_many_arguments)]
pub fn forward_backward(
    cfg: &LossConfig,
    lb: &mut LossBufs,
    ranks: &mut dyn Collective,
    z_s: &[f32],
    z_t: &[f32],
    v_s: &[f32],
    g_s: &[f32],
    v_t: &[f32],
    g_t: &[f32],
    center: &[f32],
    next_center: &mut [f32],
    dv: &mut [f32],
    dg: &mut [f32],
) -> anyhow::Result<LossReport> {
    let (k, p, batch, n_crops) = (lb.k, lb.p, lb.batch, lb.n_crops);
    let nt = 2 * batch;
    let ns = n_crops * batch;
    let tau_s = cfg.student_temp as f32;
    let tau_t = cfg.teacher_temp as f32;
    let norm_last = cfg.norm_last_layer;

    // Teacher: targets with the previous center, and the batch statistic.
    normalize_rows(&mut lb.mu_t, &mut lb.vn_t, v_t, p);
    if norm_last {
        lb.r.fill(1.0);
    } else {
        lb.r.copy_from_slice(&g_t[..k]);
    }
    branch_terms_forward(
        &mut lb.scale_t,
        &mut lb.bias_t,
        &mut lb.dbias_t,
        &lb.r,
        tau_t,
        p,
        cfg.kind,
        cfg.approx,
    );
    normalize_rows(&mut lb.y_t, &mut lb.zn_t, &z_t[..nt * p], p);
    matmul(
        nt,
        k,
        p,
        &lb.y_t,
        Op::N,
        &lb.mu_t,
        Op::T,
        &mut lb.l_t,
        false,
    );
    if let Centering::Sinkhorn { iters } = cfg.centering {
        sinkhorn_targets(lb, nt, k, iters, ranks)?;
    } else {
        let w_t = 1.0 / nt as f32;
        teacher_shifts(&mut lb.shift, &center[..k], tau_t, cfg.centering);
        let (scale, bias, shift) = (&lb.scale_t, &lb.bias_t, &lb.shift);
        let nc = nt.div_ceil(LOSS_CHUNK);
        lb.part[..nc * k]
            .par_chunks_mut(k)
            .zip(lb.l_t.par_chunks_mut(LOSS_CHUNK * k))
            .zip(lb.p_t.par_chunks_mut(LOSS_CHUNK * k))
            .zip(lb.row_ent.par_chunks_mut(LOSS_CHUNK))
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
        lb.stat.fill(0.0);
        for part in lb.part[..nc * k].chunks_exact(k) {
            for (s, &x) in lb.stat.iter_mut().zip(part) {
                *s += x;
            }
        }
    }
    let collapse = collapse_stats(lb, nt, k);

    // Student logits, loss, and dL/d(dots) (and dL/dg) row by row.
    normalize_rows(&mut lb.mu_s, &mut lb.vn_s, v_s, p);
    if norm_last {
        lb.r.fill(1.0);
    } else {
        lb.r.copy_from_slice(&g_s[..k]);
    }
    branch_terms_forward(
        &mut lb.scale_s,
        &mut lb.bias_s,
        &mut lb.dbias_s,
        &lb.r,
        tau_s,
        p,
        cfg.kind,
        cfg.approx,
    );
    normalize_rows(&mut lb.y_s, &mut lb.zn_s, &z_s[..ns * p], p);
    matmul(
        ns,
        k,
        p,
        &lb.y_s,
        Op::N,
        &lb.mu_s,
        Op::T,
        &mut lb.dots_s,
        false,
    );
    let pairs = n_pairs(n_crops);
    let gs = 1.0 / (batch * pairs).max(1) as f32;
    {
        let (scale, bias, dbias) = (&lb.scale_s, &lb.bias_s, &lb.dbias_s);
        let p_t = &lb.p_t;
        let nc = ns.div_ceil(LOSS_CHUNK);
        lb.part[..nc * k]
            .par_chunks_mut(k)
            .zip(lb.dots_s.par_chunks(LOSS_CHUNK * k))
            .zip(lb.l_s.par_chunks_mut(LOSS_CHUNK * k))
            .zip(lb.ddots.par_chunks_mut(LOSS_CHUNK * k))
            .zip(lb.row_loss.par_chunks_mut(LOSS_CHUNK))
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
                    let i = c * LOSS_CHUNK + j;
                    let (v, b) = (i / batch, i % batch);
                    // `dd` holds the target sum, then dL/d(dots); `l` the logits, then dL/dl.
                    let n = multicrop_target_sum(dd, p_t, v, b, batch, k);
                    for (((x, &d), &s), &bb) in l.iter_mut().zip(dots).zip(scale).zip(bias) {
                        *x = s * d + bb;
                    }
                    *rl = xent_row(l, dd, n as f32, gs);
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
            dg[..k].fill(0.0);
            for part in lb.part[..nc * k].chunks_exact(k) {
                for (s, &x) in dg.iter_mut().zip(part) {
                    *s += x;
                }
            }
        }
    }
    let mut total = 0.0f32;
    for &x in &lb.row_loss[..ns] {
        total += x;
    }
    let loss = total * gs;

    // dY = dDots M, dM = dDots^T Y, then back through both normalisations.
    matmul(
        ns,
        p,
        k,
        &lb.ddots,
        Op::N,
        &lb.mu_s,
        Op::N,
        &mut lb.dy,
        false,
    );
    matmul(
        k,
        p,
        ns,
        &lb.ddots,
        Op::T,
        &lb.y_s,
        Op::N,
        &mut lb.dmu,
        false,
    );
    {
        let (dy, y_s, zn) = (&lb.dy, &lb.y_s, &lb.zn_s);
        lb.dz[..ns * p]
            .par_chunks_mut(p)
            .enumerate()
            .for_each(|(i, o)| {
                l2norm_row_backward(
                    o,
                    &dy[i * p..(i + 1) * p],
                    &y_s[i * p..(i + 1) * p],
                    zn[i],
                    NORM_EPS,
                )
            });
        let (dmu, mu, vn) = (&lb.dmu, &lb.mu_s, &lb.vn_s);
        dv[..k * p]
            .par_chunks_mut(p)
            .enumerate()
            .for_each(|(i, o)| {
                l2norm_row_backward(
                    o,
                    &dmu[i * p..(i + 1) * p],
                    &mu[i * p..(i + 1) * p],
                    vn[i],
                    NORM_EPS,
                )
            });
    }

    next_center[..k].copy_from_slice(&center[..k]);
    center_update(next_center, &lb.stat, cfg.center_momentum as f32);

    let mut collapse = collapse;
    collapse.mean_kl = loss - collapse.mean_row_entropy;
    Ok(LossReport { loss, collapse })
}

/// Sinkhorn-Knopp targets of the teacher logits: the logits (`scale dots + bias`, rows in
/// parallel) go into `p_t`, `sinkhorn.rs` balances the whole batch there (over every rank's
/// rows) and gives the row entropies, then the batch statistic (the targets' mean over this
/// rank's rows).
fn sinkhorn_targets(
    lb: &mut LossBufs,
    nt: usize,
    k: usize,
    iters: u32,
    ranks: &mut dyn Collective,
) -> anyhow::Result<()> {
    let (scale, bias) = (&lb.scale_t, &lb.bias_t);
    lb.p_t[..nt * k]
        .par_chunks_mut(k)
        .zip(lb.l_t.par_chunks(k))
        .for_each(|(pt, dots)| {
            for (((x, &d), &s), &b) in pt.iter_mut().zip(dots).zip(scale).zip(bias) {
                *x = s * d + b;
            }
        });
    sinkhorn_targets_over_ranks(
        &mut lb.p_t[..nt * k],
        &mut lb.col_max,
        &mut lb.col_sum,
        &mut lb.row_ent[..nt],
        nt,
        k,
        iters,
        &mut SinkhornOver(ranks),
    )?;
    lb.stat.fill(0.0);
    add_row_mean(&mut lb.stat, &lb.p_t, nt, k);
    Ok(())
}

/// Core's collapse statistics, with the row entropies computed in parallel (`row_ent`).
fn collapse_stats(lb: &mut LossBufs, rows: usize, k: usize) -> CollapseStats<f32> {
    let h_rows: f32 = lb.row_ent[..rows].iter().fold(0.0, |a, &h| a + h);
    collapse_stats_given_row_entropy(&lb.p_t, rows, k, &mut lb.mean_p, h_rows, 0.0)
}
