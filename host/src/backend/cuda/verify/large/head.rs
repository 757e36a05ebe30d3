//! The DINO head's loss kernels at production shapes (K = 65536, batch 64, 2 + 8 crops):
//! `lse_combine` (row log-sum-exps from the logits GEMM's tile states), `teacher_targets` and
//! `teacher_stat` (the teacher's centered softmax, its raw LSE and the center statistic, both
//! centerings) and `xent_columns` (the fused multi-crop cross-entropy and its gradient). Sampled
//! rows and columns lie in the corner blocks; references are f64 of the kernels' documented
//! formulas.
use anyhow::Result;

use dinovmf_core::loss::{n_pairs, n_teacher_views};

use super::{first_last, runs, Buf, L};
use dinovmf_core::centering::Centering;

use crate::backend::cuda::device::Device;
use crate::backend::cuda::launch::head::{self as launch, LogitTerms, TeacherIn, XentColumns};

fn lse64(z: impl Iterator<Item = f64> + Clone) -> f64 {
    let mx = z.clone().fold(f64::NEG_INFINITY, f64::max);
    mx + z.map(|v| (v - mx).exp()).sum::<f64>().ln()
}

/// `lse[m]` from `lse_part[m, ntiles]` (pairs `(max, sum of exp(x - max))`), one block per row.
pub(super) fn lse_combine<D: Device>(l: &mut L<'_, D>, m: usize, ntiles: usize) -> Result<()> {
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
            lse64(p.chunks(2).map(|s| s[0] as f64 + (s[1] as f64).ln()))
        })
        .collect();
    l.check(
        "lse_combine",
        format!("{m}x{ntiles} tiles"),
        &got,
        &want,
        (1e-6, 1e-5),
    );
    Ok(())
}

/// `teacher_targets` (one block per teacher row: the first and the last row run) and
/// `teacher_stat` (one thread per prototype: the first and the last 256 columns), for logit
/// (0) and probability (1) centering.
pub(super) fn teacher<D: Device>(l: &mut L<'_, D>, nt: usize, k: usize) -> Result<()> {
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
            *v = lse64((0..k).map(|j| l64(r, j)));
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
            let sh = lse64((0..k).map(|j| l64(r, j) - shift(j)));
            want_p.extend((0..k).map(|j| (l64(r, j) - shift(j) - sh).exp()));
            want_raw.push(raw64[r]);
        }
        let want_stat: Vec<f64> = cols
            .iter()
            .map(|&j| {
                (0..nt)
                    .map(|r| {
                        if centering == 0 {
                            tau_t as f64 * l64(r, j)
                        } else {
                            (l64(r, j) - raw64[r]).exp()
                        }
                    })
                    .sum::<f64>()
                    / nt as f64
            })
            .collect();
        let what = ["logit", "probability"][centering as usize];
        let got = l.get_at(p_t, &p_runs)?;
        // Probabilities of about 1 / K: relative error of exp(x - lse), |x| ~ 25.
        l.check(
            "teacher_targets",
            format!("p_t {nt}x{k} {what}"),
            &got,
            &want_p,
            (1e-4, 1e-12),
        );
        let got = l.get_at(lse_raw, &row_runs)?;
        l.check(
            "teacher_targets",
            format!("lse_raw {nt}x{k} {what}"),
            &got,
            &want_raw,
            (1e-6, 1e-5),
        );
        let got = l.get_at(stat, &col_runs)?;
        l.check(
            "teacher_stat",
            format!("{nt}x{k} {what}"),
            &got,
            &want_stat,
            (1e-4, 1e-9),
        );
    }
    Ok(())
}

/// Uploads `vals[rows, cols.len()]` into the sampled columns `col_runs` of a `[rows, k]` buffer.
fn upload_columns<D: Device>(
    l: &mut L<'_, D>,
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
pub(super) fn xent_columns<D: Device>(
    l: &mut L<'_, D>,
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
    for i in 0..ns {
        for ci in 0..nc {
            let (_, r, loss) = term(i, ci);
            want_dr[ci] += r;
            want_part[usize::from(cols[ci] >= 256)] += loss;
        }
    }
    let size = format!("{n_crops}x{batch} rows x {k}");
    l.check(
        "xent_columns",
        format!("dL/d dots {size}"),
        &got,
        &want,
        (1e-4, 1e-9),
    );
    l.check(
        "xent_columns",
        format!("dr {size}"),
        &got_dr,
        &want_dr,
        (1e-4, 1e-5),
    );
    l.check(
        "xent_columns",
        format!("loss parts {size}"),
        &got_part,
        &want_part,
        (1e-4, 1e-4),
    );
    Ok(())
}
