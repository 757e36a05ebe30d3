//! The DINO head's loss kernels against core's functions (or f64 of the kernels' documented
//! formulas): the per-prototype logit terms (`branch_terms`, DINO and vMF, both Bessel
//! approximations), the logits GEMM with its per-tile log-sum-exp states and `lse_combine`,
//! the teacher's centered softmax, raw LSE and center statistic (`teacher_targets`,
//! `teacher_stat`, both per-row centerings), `row_entropy`, `center_update`, and the fused
//! multi-crop cross-entropy with its gradient (`xent_columns`). Small: one prototype, below,
//! at and above the 64-column tile and the 256-thread block. At the production shapes (K =
//! 65536, batch 64, 2 + 8 crops): sampled rows and columns in the corner blocks.
use anyhow::Result;
use rand::Rng;

use dinovmf_core::centering::{center_update, Centering, CENTER_FLOOR};
use dinovmf_core::collapse::entropy;
use dinovmf_core::logits::{branch_terms_forward, LogitKind};
use dinovmf_core::loss::{n_pairs, n_teacher_views};
use dinovmf_core::vmf::BesselApprox;

use super::sample::{ends, f64s, first_last, runs};
use super::shapes::LargeShape;
use super::tolerance::{self, EXACT};
use super::V;
use crate::backend::cuda::device::{Buf, Device};
use crate::backend::cuda::launch::head::{
    self as launch, branch_terms as branch_terms_launch, center_update as center_update_launch,
    gemm_logits_f32, lse_combine, row_entropy, teacher_stat, teacher_targets,
    xent_columns as xent_columns_launch, BranchDims, LogitTerms, TeacherIn, XentColumns,
};

pub(super) fn small<D: Device>(v: &mut V<'_, D>) {
    v.case("branch_terms", branch_terms);
    v.case("logits", logits);
    v.case("teacher", teacher);
    v.case("xent_columns", xent_columns);
}

pub(super) fn large<D: Device>(v: &mut V<'_, D>, s: &LargeShape) {
    v.case("logits", |v| {
        logits_large(v, s.students(), s.k, s.bottleneck)
    });
    if !s.head {
        return;
    }
    v.case("lse_combine", |v| {
        lse_combine_large(v, s.students(), s.k.div_ceil(64))
    });
    v.case("teacher targets", |v| teacher_large(v, s.batch * 2, s.k));
    v.case("xent_columns", |v| {
        xent_columns_large(v, 2 + s.n_local, s.batch, s.k)
    });
    v.case("teacher row entropy", |v| {
        row_entropy_large(v, s.batch * 2, s.k)
    });
}

fn branch_terms<D: Device>(v: &mut V<'_, D>) -> Result<()> {
    for kind in [LogitKind::Dino, LogitKind::Vmf] {
        for approx in [BesselApprox::Uniform, BesselApprox::LargeNu] {
            for (k, p) in [(1, 16), (255, 128), (300, 256)] {
                let r = v.rv(k, 0.2, 3.0);
                let dr = v.up(&r)?;
                let (sc, bi, db) = (v.out(k)?, v.out(k)?, v.out(k)?);
                let tau = 0.1f32;
                let terms = LogitTerms {
                    scale: sc,
                    bias: bi,
                    dbias: db,
                };
                let dims = BranchDims {
                    k,
                    p,
                    tau,
                    kind,
                    approx,
                };
                branch_terms_launch(v.gpu, terms, dr, dims)?;
                let mut got = v.get(sc)?;
                got.extend(v.get(bi)?);
                got.extend(v.get(db)?);
                // The kernel calls core's f32 function per prototype.
                let (mut ws, mut wb, mut wd) = (vec![0f32; k], vec![0f32; k], vec![0f32; k]);
                branch_terms_forward(&mut ws, &mut wb, &mut wd, &r, tau, p, kind, approx);
                let mut want = f64s(&ws);
                want.extend(f64s(&wb));
                want.extend(f64s(&wd));
                v.check(
                    "branch_terms",
                    format!("{kind:?} {approx:?} k{k} p{p}"),
                    &got,
                    &want,
                    tolerance::BRANCH_TERMS,
                );
            }
        }
    }
    Ok(())
}

/// The largest magnitude of `x`.
pub(super) fn largest_f32(x: &[f32]) -> f64 {
    x.iter().fold(0f64, |m, &v| m.max(v.abs() as f64))
}

/// `ln Σ exp(x)` in f64.
pub(super) fn lse(x: impl Iterator<Item = f64> + Clone) -> f64 {
    let m = x.clone().fold(f64::NEG_INFINITY, f64::max);
    if m == f64::NEG_INFINITY {
        return m;
    }
    m + x.map(|v| (v - m).exp()).sum::<f64>().ln()
}

fn logits<D: Device>(v: &mut V<'_, D>) -> Result<()> {
    {
        let name = "gemm_logits_f32";
        for (m, n, k) in [(1, 1, 1), (17, 130, 16), (65, 64, 33), (6, 300, 128)] {
            let y = v.rv(m * k, -1.0, 1.0);
            let mu = v.rv(n * k, -1.0, 1.0);
            let scale = v.rv(n, 1.0, 10.0);
            let bias = v.rv(n, -1.0, 1.0);
            let (dy, dmu) = (v.up(&y)?, v.up(&mu)?);
            let (ds, db) = (v.up(&scale)?, v.up(&bias)?);
            let ntiles = n.div_ceil(64);
            let (dots, part) = (v.out(m * n)?, v.out(m * ntiles * 2)?);
            gemm_logits_f32(v.gpu, dots, part, dy, dmu, ds, db, (m, n, k))?;
            let got = v.get(dots)?;
            let pt = v.get(part)?;
            let mut want = Vec::with_capacity(m * n);
            for i in 0..m {
                for j in 0..n {
                    want.push(
                        (0..k)
                            .map(|c| y[i * k + c] as f64 * mu[j * k + c] as f64)
                            .sum(),
                    );
                }
            }
            // Each tile's state (max, sum) as one log-sum-exp of its columns' logits.
            let (mut got_lse, mut want_lse) = (Vec::new(), Vec::new());
            for i in 0..m {
                for t in 0..ntiles {
                    let (mx, s) = (pt[(i * ntiles + t) * 2], pt[(i * ntiles + t) * 2 + 1]);
                    got_lse.push(mx + s.ln());
                    let cols = (t * 64..((t + 1) * 64).min(n))
                        .map(|j| scale[j] as f64 * want[i * n + j] + bias[j] as f64);
                    want_lse.push(lse(cols));
                }
            }
            let size = format!("{m}x{n}x{k}");
            v.check(name, format!("dots {size}"), &got, &want, tolerance::dot(k));
            let what = format!("tile lse {size}");
            v.check(name, what, &got_lse, &want_lse, tolerance::LSE);
        }
    }
    for (m, ntiles) in [(1, 1), (3, 5), (7, 300)] {
        let mut part = Vec::with_capacity(m * ntiles * 2);
        for _ in 0..m * ntiles {
            part.push(v.rng.gen_range(-5.0f32..5.0));
            part.push(v.rng.gen_range(1.0f32..64.0));
        }
        let dp = v.up(&part)?;
        let out = v.out(m)?;
        lse_combine(v.gpu, out, dp, m, ntiles)?;
        let got = v.get(out)?;
        let want: Vec<f64> = (0..m)
            .map(|i| {
                let terms = (0..ntiles).map(|t| {
                    let o = (i * ntiles + t) * 2;
                    part[o] as f64 + (part[o + 1] as f64).ln()
                });
                lse(terms)
            })
            .collect();
        v.check(
            "lse_combine",
            format!("{m} rows x {ntiles} tiles"),
            &got,
            &want,
            tolerance::LSE,
        );
    }
    Ok(())
}

fn teacher<D: Device>(v: &mut V<'_, D>) -> Result<()> {
    // Per-row centerings only (Sinkhorn has kernels of its own, checked in `sinkhorn.rs`): the
    // matches below treat anything but logit as probability, as `Centering::from_code` does.
    for centering in [Centering::Logit, Centering::Probability] {
        for (nt, k) in [(2, 1), (4, 255), (6, 300), (3, 1030)] {
            let dots = v.rv(nt * k, -1.0, 1.0);
            let scale = v.rv(k, 1.0, 10.0);
            let bias = v.rv(k, -1.0, 1.0);
            let center: Vec<f32> = match centering {
                Centering::Logit => v.rv(k, -2.0, 2.0),
                Centering::Probability | Centering::Sinkhorn { .. } => v.rv(k, 0.0, 2.0 / k as f32),
            };
            let tau_t = 0.04f32;
            let (dd, ds, db, dc) = (v.up(&dots)?, v.up(&scale)?, v.up(&bias)?, v.up(&center)?);
            let (p_t, lse_raw) = (v.out(nt * k)?, v.out(nt)?);
            let t_in = TeacherIn {
                dots: dd,
                scale: ds,
                bias: db,
                tau_t,
                centering,
                n: nt,
                k,
            };
            teacher_targets(v.gpu, p_t, lse_raw, dc, &t_in)?;
            let got = v.get(p_t)?;
            let got_raw = v.get(lse_raw)?;
            let l = |r: usize, j: usize| scale[j] as f64 * dots[r * k + j] as f64 + bias[j] as f64;
            let shift = |j: usize| match centering {
                Centering::Logit => center[j] as f64 / tau_t as f64,
                Centering::Probability | Centering::Sinkhorn { .. } => {
                    (center[j].max(CENTER_FLOOR as f32) as f64).ln()
                }
            };
            let mut want = Vec::new();
            let mut lse_w = Vec::new();
            for r in 0..nt {
                let z = lse((0..k).map(|j| l(r, j) - shift(j)));
                want.extend((0..k).map(|j| (l(r, j) - shift(j) - z).exp()));
                lse_w.push(lse((0..k).map(|j| l(r, j))));
            }
            let size = format!("{centering:?} nt{nt} k{k}");
            let what = format!("p_t {size}");
            v.check(
                "teacher_targets",
                what,
                &got,
                &want,
                tolerance::PROBABILITIES,
            );
            let what = format!("lse_raw {size}");
            v.check("teacher_targets", what, &got_raw, &lse_w, tolerance::LSE);

            let stat = v.out(k)?;
            teacher_stat(v.gpu, stat, lse_raw, &t_in)?;
            let got = v.get(stat)?;
            let term = |r: usize, j: usize| match centering {
                Centering::Logit => tau_t as f64 * l(r, j),
                Centering::Probability | Centering::Sinkhorn { .. } => (l(r, j) - lse_w[r]).exp(),
            };
            let want: Vec<f64> = (0..k)
                .map(|j| (0..nt).map(|r| term(r, j)).sum::<f64>() / nt as f64)
                .collect();
            let big = (0..nt * k).fold(0f64, |a, e| a.max(term(e / k, e % k).abs()));
            let tol = tolerance::teacher_stat(big);
            v.check("teacher_stat", size.clone(), &got, &want, tol);

            // Rows of P_t (and the batch mean as one row) for the collapse signals.
            let ent = v.out(nt)?;
            row_entropy(v.gpu, ent, p_t, nt, k)?;
            let got = v.get(ent)?;
            let pt = v.get(p_t)?;
            let want: Vec<f64> = pt.chunks_exact(k).map(|r| entropy(&f64s(r))).collect();
            v.check(
                "row_entropy",
                size.clone(),
                &got,
                &want,
                tolerance::ROW_ENTROPY,
            );

            let c0 = v.rv(k, -1.0, 1.0);
            let st = v.rv(k, -1.0, 1.0);
            let (dc0, dst) = (v.up(&c0)?, v.up(&st)?);
            center_update_launch(v.gpu, dc0, dst, 0.9, k)?;
            let got = v.get(dc0)?;
            let mut w = c0.clone();
            center_update(&mut w, &st, 0.9f32);
            v.check("center_update", format!("k{k}"), &got, &f64s(&w), EXACT);
        }
    }
    // Probability rows of their own (softmax of logits in [-6, 6)), one exact zero per row
    // (0 ln 0 = 0): one value, below, at and above the 256-thread block, and wide.
    for (rows, k) in [(1, 1), (3, 255), (5, 256), (2, 257), (4, 1000)] {
        let mut p = v.rv(rows * k, -6.0, 6.0);
        for row in p.chunks_exact_mut(k) {
            let z = lse(row.iter().map(|&x| x as f64));
            row.iter_mut()
                .for_each(|x| *x = (*x as f64 - z).exp() as f32);
            row[k / 3] = 0.0;
        }
        let dp = v.up(&p)?;
        let ent = v.out(rows)?;
        row_entropy(v.gpu, ent, dp, rows, k)?;
        let got = v.get(ent)?;
        let want: Vec<f64> = p.chunks_exact(k).map(|r| entropy(&f64s(r))).collect();
        let size = format!("{rows} rows k{k}, a zero each");
        v.check("row_entropy", size, &got, &want, tolerance::ROW_ENTROPY);
    }
    Ok(())
}

fn xent_columns<D: Device>(v: &mut V<'_, D>) -> Result<()> {
    for (n_crops, batch, k, with_dr) in [
        (2, 1, 1, true),
        (4, 3, 255, false),
        (6, 2, 300, true),
        (2, 5, 700, true),
    ] {
        let ns = n_crops * batch;
        let dots = v.rv(ns * k, -1.0, 1.0);
        let scale = v.rv(k, 1.0, 10.0);
        let bias = v.rv(k, -1.0, 1.0);
        let dbias = v.rv(k, -1.0, 1.0);
        // Teacher rows: softmax of random logits.
        let mut p_t = v.rv(2 * batch * k, -3.0, 3.0);
        for row in p_t.chunks_exact_mut(k) {
            let z = lse(row.iter().map(|&x| x as f64));
            for x in row.iter_mut() {
                *x = (*x as f64 - z).exp() as f32;
            }
        }
        let tau = 0.1f32;
        let l = |i: usize, j: usize| scale[j] as f64 * dots[i * k + j] as f64 + bias[j] as f64;
        let lse_rows: Vec<f64> = (0..ns).map(|i| lse((0..k).map(|j| l(i, j)))).collect();
        let lse32: Vec<f32> = lse_rows.iter().map(|&x| x as f32).collect();
        let dr0 = v.rv(k, -1.0, 1.0);
        let (ddots, dl, dp, ds, db, ddb) = (
            v.up(&dots)?,
            v.up(&lse32)?,
            v.up(&p_t)?,
            v.up(&scale)?,
            v.up(&bias)?,
            v.up(&dbias)?,
        );
        let ddr = v.up(&dr0)?;
        let nparts = k.div_ceil(256);
        let lp = v.out(nparts)?;
        let args = XentColumns {
            dots: ddots,
            dr: with_dr.then_some(ddr),
            loss_part: lp,
            lse: dl,
            p_t: dp,
            terms: LogitTerms {
                scale: ds,
                bias: db,
                dbias: ddb,
            },
            tau,
            n_crops,
            batch,
            k,
        };
        xent_columns_launch(v.gpu, &args)?;
        let gs = 1.0 / (batch * n_pairs(n_crops)).max(1) as f64;
        let (mut wd, mut wdr, mut wlp) = (vec![0f64; ns * k], f64s(&dr0), vec![0f64; nparts]);
        // The largest term of each sum (the tolerance of an f32 sum scales with it).
        let (mut big_loss, mut big_r) = (0f64, 0f64);
        for j in 0..k {
            let mut acc = 0.0;
            for vv in 0..n_crops {
                let nq = n_teacher_views(vv) as f64;
                for bi in 0..batch {
                    let i = vv * batch + bi;
                    let tgt: f64 = (0..2)
                        .filter(|&q| q != vv)
                        .map(|q| p_t[(q * batch + bi) * k + j] as f64)
                        .sum();
                    let x = l(i, j);
                    let nls = lse32[i] as f64 - x;
                    wlp[j / 256] += tgt * nls;
                    let dlv = (nq * (-nls).exp() - tgt) * gs;
                    wd[i * k + j] = dlv * scale[j] as f64;
                    let r = dlv * (dots[i * k + j] as f64 / tau as f64 + dbias[j] as f64);
                    acc += r;
                    big_loss = big_loss.max((tgt * nls).abs());
                    big_r = big_r.max(r.abs());
                }
            }
            if with_dr {
                wdr[j] += acc;
            }
        }
        let size = format!("crops{n_crops} B{batch} k{k} dr={with_dr}");
        let got = v.get(ddots)?;
        let what = format!("dL/d dots {size}");
        let tol = tolerance::xent_ddots(largest_f32(&scale) * gs);
        v.check("xent_columns", what, &got, &wd, tol);
        let got = v.get(lp)?;
        let what = format!("loss parts {size}");
        let tol = tolerance::sum_of(ns * 256, big_loss);
        v.check("xent_columns", what, &got, &wlp, tol);
        let got = v.get(ddr)?;
        let tol = tolerance::sum_of(ns, big_r);
        v.check("xent_columns", format!("dr {size}"), &got, &wdr, tol);
    }
    Ok(())
}

/// The student logits GEMM at `m x K x bottleneck`: sampled rows of `dots` (every column, so the
/// first and the last 64-column tile) and their per-tile LSE states of `scale dots + bias`.
fn logits_large<D: Device>(l: &mut V<'_, D>, m: usize, n: usize, k: usize) -> Result<()> {
    let y = l.rv(m * k, -0.2, 0.2);
    let mu = l.rv(n * k, -0.2, 0.2);
    let scale = l.rv(n, 5.0, 15.0);
    let bias = l.rv(n, -1.0, 1.0);
    let ntiles = n.div_ceil(64);
    let (rows, cols) = (ends(m, 3), first_last(n, 64));
    let at = V::<D>::cells(&rows, &cols, n);
    let tiles = [0, 1, 2 * ntiles - 2, 2 * ntiles - 1];
    let at_part = V::<D>::cells(&rows, &tiles, ntiles * 2);
    let (dy, dmu, ds, db) = (l.up(&y)?, l.up(&mu)?, l.up(&scale)?, l.up(&bias)?);
    let dots = l.out_at(m * n, &at)?;
    let part = l.out_at(m * ntiles * 2, &at_part)?;
    gemm_logits_f32(l.gpu, dots, part, dy, dmu, ds, db, (m, n, k))?;
    let got = l.get_at(dots, &at)?;
    let parts = l.get_at(part, &at_part)?;
    let mut want = Vec::new();
    let (mut got_lse, mut want_lse) = (Vec::new(), Vec::new());
    for (ri, &r) in rows.iter().enumerate() {
        let dot = |j: usize| -> f64 {
            (0..k)
                .map(|t| y[r * k + t] as f64 * mu[j * k + t] as f64)
                .sum()
        };
        for (ti, tile) in [0, ntiles - 1].into_iter().enumerate() {
            let z: Vec<f64> = (tile * 64..((tile + 1) * 64).min(n))
                .map(|j| scale[j] as f64 * dot(j) + bias[j] as f64)
                .collect();
            let mx = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            want_lse.push(mx + z.iter().map(|v| (v - mx).exp()).sum::<f64>().ln());
            let o = (ri * 2 + ti) * 2;
            got_lse.push(parts[o] + parts[o + 1].ln());
        }
        want.extend(cols.iter().map(|&j| dot(j)));
    }
    l.check(
        "gemm_logits_f32",
        format!("dots {m}x{n}x{k}"),
        &got,
        &want,
        tolerance::dot(k),
    );
    l.check(
        "gemm_logits_f32",
        format!("tile lse {m}x{n}"),
        &got_lse,
        &want_lse,
        tolerance::LSE,
    );
    Ok(())
}

/// `lse[m]` from `lse_part[m, ntiles]` (pairs `(max, sum of exp(x - max))`), one block per row.
fn lse_combine_large<D: Device>(l: &mut V<'_, D>, m: usize, ntiles: usize) -> Result<()> {
    let mut part = Vec::with_capacity(m * ntiles * 2);
    for _ in 0..m * ntiles {
        part.push(l.rv(1, -3.0, 12.0)[0]);
        part.push(l.rv(1, 1.0, 64.0)[0]);
    }
    let rows = [0, m - 1];
    let at: Vec<(usize, usize)> = rows.iter().map(|&r| (r, 1)).collect();
    let dpart = l.up(&part)?;
    let lse = l.out_at(m, &at)?;
    launch::lse_combine(l.gpu, lse, dpart, m, ntiles)?;
    let got = l.get_at(lse, &at)?;
    let want: Vec<f64> = rows
        .iter()
        .map(|&r| {
            let p = &part[r * ntiles * 2..(r + 1) * ntiles * 2];
            self::lse(p.chunks(2).map(|s| s[0] as f64 + (s[1] as f64).ln()))
        })
        .collect();
    l.check(
        "lse_combine",
        format!("{m}x{ntiles} tiles"),
        &got,
        &want,
        tolerance::LSE,
    );
    Ok(())
}

/// `teacher_targets` (one block per teacher row: the first and the last row run) and
/// `teacher_stat` (one thread per prototype: the first and the last 256 columns), for logit
/// (0) and probability (1) centering.
fn teacher_large<D: Device>(l: &mut V<'_, D>, nt: usize, k: usize) -> Result<()> {
    let tau_t = 0.04f32;
    let dots = l.rv(nt * k, -1.0, 1.0);
    let scale = l.rv(k, 0.5, 1.5);
    let bias = l.rv(k, -0.1, 0.1);
    let (dd, ds, db) = (l.up(&dots)?, l.up(&scale)?, l.up(&bias)?);
    let rows = [0, nt - 1];
    let cols = first_last(k, 256);
    let col_runs = runs(&cols);
    let p_runs: Vec<(usize, usize)> = rows.iter().map(|&r| (r * k, k)).collect();
    let row_runs: Vec<(usize, usize)> = rows.iter().map(|&r| (r, 1)).collect();
    let l64 = |r: usize, j: usize| scale[j] as f64 * dots[r * k + j] as f64 + bias[j] as f64;
    for centering in [0u32, 1] {
        // Logit centers near tau_t * l, probability centers near 1 / K.
        let center = if centering == 0 {
            l.rv(k, -0.04, 0.04)
        } else {
            l.rv(k, 0.5 / k as f32, 1.5 / k as f32)
        };
        let dc = l.up(&center)?;
        let p_t = l.out_at(nt * k, &p_runs)?;
        let lse_raw = l.out_at(nt, &row_runs)?;
        let stat = l.out_at(k, &col_runs)?;
        let t_in = TeacherIn {
            dots: dd,
            scale: ds,
            bias: db,
            tau_t,
            centering: Centering::from_code(centering),
            n: nt,
            k,
        };
        launch::teacher_targets(l.gpu, p_t, lse_raw, dc, &t_in)?;
        // teacher_stat reads every row's lse_raw: the rows the corner blocks did not write get
        // their f64 values.
        let mut raw64 = vec![0f64; nt];
        for (r, v) in raw64.iter_mut().enumerate() {
            *v = lse((0..k).map(|j| l64(r, j)));
            if r != 0 && r != nt - 1 {
                l.gpu.upload(lse_raw.sub(r, 1), &[*v as f32])?;
            }
        }
        launch::teacher_stat(l.gpu, stat, lse_raw, &t_in)?;
        let shift = |j: usize| -> f64 {
            if centering == 0 {
                center[j] as f64 / tau_t as f64
            } else {
                (center[j] as f64).max(1e-30).ln()
            }
        };
        let (mut want_p, mut want_raw) = (Vec::new(), Vec::new());
        for &r in &rows {
            let sh = lse((0..k).map(|j| l64(r, j) - shift(j)));
            want_p.extend((0..k).map(|j| (l64(r, j) - shift(j) - sh).exp()));
            want_raw.push(raw64[r]);
        }
        let term = |r: usize, j: usize| {
            if centering == 0 {
                tau_t as f64 * l64(r, j)
            } else {
                (l64(r, j) - raw64[r]).exp()
            }
        };
        let want_stat: Vec<f64> = cols
            .iter()
            .map(|&j| (0..nt).map(|r| term(r, j)).sum::<f64>() / nt as f64)
            .collect();
        let big = cols
            .iter()
            .flat_map(|&j| (0..nt).map(move |r| (r, j)))
            .fold(0f64, |a, (r, j)| a.max(term(r, j).abs()));
        let what = ["logit", "probability"][centering as usize];
        let got = l.get_at(p_t, &p_runs)?;
        // Probabilities of about 1 / K: relative error of exp(x - lse), |x| ~ 25.
        l.check(
            "teacher_targets",
            format!("p_t {nt}x{k} {what}"),
            &got,
            &want_p,
            tolerance::PROBABILITIES,
        );
        let got = l.get_at(lse_raw, &row_runs)?;
        l.check(
            "teacher_targets",
            format!("lse_raw {nt}x{k} {what}"),
            &got,
            &want_raw,
            tolerance::LSE,
        );
        let got = l.get_at(stat, &col_runs)?;
        l.check(
            "teacher_stat",
            format!("{nt}x{k} {what}"),
            &got,
            &want_stat,
            tolerance::teacher_stat(big),
        );
    }
    Ok(())
}

/// Uploads `vals[rows, cols.len()]` into the sampled columns `col_runs` of a `[rows, k]` buffer.
fn upload_columns<D: Device>(
    l: &mut V<'_, D>,
    buf: Buf<f32>,
    vals: &[f32],
    rows: usize,
    k: usize,
    col_runs: &[(usize, usize)],
) -> Result<()> {
    let nc: usize = col_runs.iter().map(|r| r.1).sum();
    for r in 0..rows {
        let mut o = 0;
        for &(s, len) in col_runs {
            l.gpu
                .upload(buf.sub(r * k + s, len), &vals[r * nc + o..r * nc + o + len])?;
            o += len;
        }
    }
    Ok(())
}

/// `xent_columns` for `n_crops` crops of `batch` images over K prototypes: one thread per
/// prototype walks all `n_crops * batch` student rows. Only the first and the last 256-column
/// block run on the simulator, so only their columns hold data. Checks `dL/d dots` on sampled
/// rows, `dr` on those columns and the two blocks' loss parts.
fn xent_columns_large<D: Device>(
    l: &mut V<'_, D>,
    n_crops: usize,
    batch: usize,
    k: usize,
) -> Result<()> {
    let ns = n_crops * batch;
    let cols = first_last(k, 256);
    let col_runs = runs(&cols);
    let nc = cols.len();
    let tau = 0.1f32;
    let scale = l.rv(k, 5.0, 15.0);
    let bias = l.rv(k, -1.0, 1.0);
    let dbias = l.rv(k, -0.5, 0.5);
    let dr0 = l.rv(k, -1.0, 1.0);
    let lse = l.rv(ns, 7.0, 9.0);
    let dots_c = l.rv(ns * nc, -0.2, 0.2);
    let pt_c = l.rv(2 * batch * nc, 0.0, 1.0 / 256.0);
    let dots = l.gpu.alloc::<f32>(ns * k)?;
    let p_t = l.gpu.alloc::<f32>(2 * batch * k)?;
    upload_columns(l, dots, &dots_c, ns, k, &col_runs)?;
    upload_columns(l, p_t, &pt_c, 2 * batch, k, &col_runs)?;
    let (ds, db, ddb, dlse, dr) = (
        l.up(&scale)?,
        l.up(&bias)?,
        l.up(&dbias)?,
        l.up(&lse)?,
        l.up(&dr0)?,
    );
    let nb = k.div_ceil(256);
    let part_at = [(0, 1), (nb - 1, 1)];
    let part = l.out_at(nb, &part_at)?;
    let args = XentColumns {
        dots,
        dr: Some(dr),
        loss_part: part,
        lse: dlse,
        p_t,
        terms: LogitTerms {
            scale: ds,
            bias: db,
            dbias: ddb,
        },
        tau,
        n_crops,
        batch,
        k,
    };
    launch::xent_columns(l.gpu, &args)?;
    let rows: Vec<usize> = [0, 1, batch, 2 * batch, ns - 1].into();
    let mut at = Vec::new();
    for &r in &rows {
        at.extend(col_runs.iter().map(|&(s, len)| (r * k + s, len)));
    }
    let got = l.get_at(dots, &at)?;
    let got_dr = l.get_at(dr, &col_runs)?;
    let got_part = l.get_at(part, &part_at)?;
    let gs = 1.0 / (batch * n_pairs(n_crops)) as f64;
    // (dL/d dots, dL/dr term, loss term) of student row i = v batch + b at sampled column ci.
    let term = |i: usize, ci: usize| -> (f64, f64, f64) {
        let (v, bi, j) = (i / batch, i % batch, cols[ci]);
        let tgt: f64 = (0..2)
            .filter(|&q| q != v)
            .map(|q| pt_c[(q * batch + bi) * nc + ci] as f64)
            .sum();
        let d = dots_c[i * nc + ci] as f64;
        let nls = lse[i] as f64 - (scale[j] as f64 * d + bias[j] as f64);
        let dl = (n_teacher_views(v) as f64 * (-nls).exp() - tgt) * gs;
        (
            dl * scale[j] as f64,
            dl * (d / tau as f64 + dbias[j] as f64),
            tgt * nls,
        )
    };
    let mut want = Vec::new();
    for &i in &rows {
        want.extend((0..nc).map(|ci| term(i, ci).0));
    }
    let mut want_dr: Vec<f64> = cols.iter().map(|&j| dr0[j] as f64).collect();
    let mut want_part = [0f64; 2];
    let (mut big_r, mut big_loss) = (0f64, 0f64);
    for i in 0..ns {
        for ci in 0..nc {
            let (_, r, loss) = term(i, ci);
            want_dr[ci] += r;
            want_part[usize::from(cols[ci] >= 256)] += loss;
            big_r = big_r.max(r.abs());
            big_loss = big_loss.max(loss.abs());
        }
    }
    let size = format!("{n_crops}x{batch} rows x {k}");
    l.check(
        "xent_columns",
        format!("dL/d dots {size}"),
        &got,
        &want,
        tolerance::xent_ddots(largest_f32(&scale) * gs),
    );
    l.check(
        "xent_columns",
        format!("dr {size}"),
        &got_dr,
        &want_dr,
        tolerance::sum_of(ns, big_r),
    );
    l.check(
        "xent_columns",
        format!("loss parts {size}"),
        &got_part,
        &want_part,
        tolerance::sum_of(ns * 256, big_loss),
    );
    Ok(())
}

/// `ent[r] = -sum_j p ln p` of `rows` distributions over `k` (one block per row).
fn row_entropy_large<D: Device>(l: &mut V<'_, D>, rows: usize, k: usize) -> Result<()> {
    let p = l.rv(rows * k, 0.0, 2.0 / k as f32);
    let at = [(0, 1), (rows - 1, 1)];
    let dp = l.up(&p)?;
    let ent = l.out_at(rows, &at)?;
    launch::row_entropy(l.gpu, ent, dp, rows, k)?;
    let got = l.get_at(ent, &at)?;
    let want: Vec<f64> = [0, rows - 1]
        .iter()
        .map(|&r| {
            -p[r * k..(r + 1) * k]
                .iter()
                .filter(|&&v| v > 0.0)
                .map(|&v| v as f64 * (v as f64).ln())
                .sum::<f64>()
        })
        .collect();
    l.check(
        "row_entropy",
        format!("{rows}x{k}"),
        &got,
        &want,
        tolerance::ROW_ENTROPY,
    );
    Ok(())
}
