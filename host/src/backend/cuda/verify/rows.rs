//! Row kernels: LayerNorm forward and backward (`dx` one warp per row; the parameter gradients
//! one thread per feature, each summing every row), the attention softmax (with and without a
//! key mask) and its backward, and the L2 normalisation with its backward, against core.
//! Small: one element, below, at and above the 32-lane warp and the 128-thread block, and
//! ViT-S's width. At the production shapes: LayerNorm over the 25,216 tokens of the global
//! crops, the attention softmax over 197 keys, the L2 normalisation of the prototypes and of
//! the student outputs, on the first and the last block's rows.
use anyhow::Result;

use dinovmf_core::ops;

use super::sample::{f64s, first_last, runs};
use super::shapes::LargeShape;
use super::tolerance;
use super::V;
use crate::backend::cuda::device::Device;

pub(super) fn small<D: Device>(v: &mut V<'_, D>) {
    v.case("layernorm", layernorm);
    v.case("softmax", softmax);
    v.case("l2norm", l2norm);
}

pub(super) fn large<D: Device>(v: &mut V<'_, D>, s: &LargeShape) {
    let (n, d) = (s.tokens(), s.dim);
    let scale = 1.0 / (s.head_dim() as f32).sqrt();
    v.case("layernorm", |v| layernorm_large(v, n, d));
    v.case("layernorm backward", |v| layernorm_backward_large(v, n, d));
    v.case("attention softmax", |v| {
        softmax_large(v, s.attention_rows(), s.global_tokens, scale)
    });
    v.case("attention softmax backward", |v| {
        softmax_backward_large(v, s.attention_rows(), s.global_tokens, scale)
    });
    if s.head {
        v.case("prototype l2norm", |v| {
            l2norm_large(v, "prototypes", s.k, s.bottleneck)
        });
        v.case("student l2norm", |v| {
            l2norm_large(v, "students", s.students(), s.bottleneck)
        });
    }
}

/// Rows x width of the row kernels (LayerNorm, L2 norm): one element, below, at and above the
/// 32-lane warp and the 128-thread block, and ViT-S's width.
const ROW_SHAPES: [(usize, usize); 9] = [
    (1, 1),
    (1, 7),
    (3, 31),
    (3, 32),
    (5, 33),
    (5, 64),
    (13, 100),
    (9, 384),
    (70, 33),
];

fn layernorm<D: Device>(v: &mut V<'_, D>) -> Result<()> {
    for (n, d) in ROW_SHAPES {
        let x = v.rv(n * d, -2.0, 2.0);
        let gamma = v.rv(d, 0.5, 1.5);
        let beta = v.rv(d, -0.5, 0.5);
        let (dx_, dg, db) = (v.up(&x)?, v.up(&gamma)?, v.up(&beta)?);
        let (y, mean, rstd) = (v.out(n * d)?, v.out(n)?, v.out(n)?);
        v.gpu
            .layernorm_forward(y, mean, rstd, dx_, dg, db, n, d, 1e-6)?;
        let mut got = v.get(y)?;
        got.extend(v.get(mean)?);
        got.extend(v.get(rstd)?);
        let (mut wy, mut wm, mut wr) = (vec![0f64; n * d], vec![0f64; n], vec![0f64; n]);
        ops::layernorm_forward(
            &mut wy,
            &mut wm,
            &mut wr,
            &f64s(&x),
            &f64s(&gamma),
            &f64s(&beta),
            n,
            d,
            1e-6,
        );
        let mut w = wy;
        w.extend(&wm);
        w.extend(&wr);
        let size = format!("{n}x{d}");
        v.check(
            "layernorm_forward",
            size.clone(),
            &got,
            &w,
            tolerance::LAYERNORM_FORWARD,
        );

        // Backward from the device's own statistics (as the backbone does).
        let dy = v.rv(n * d, -1.0, 1.0);
        let ddy = v.up(&dy)?;
        let dx = v.out(n * d)?;
        let dgam0 = v.rv(d, -1.0, 1.0);
        let dbet0 = v.rv(d, -1.0, 1.0);
        let (dgam, dbet) = (v.up(&dgam0)?, v.up(&dbet0)?);
        v.gpu
            .layernorm_backward(dx, dgam, dbet, ddy, dx_, mean, rstd, dg, n, d)?;
        let (m32, r32) = (v.get(mean)?, v.get(rstd)?);
        let mut wdx = vec![0f64; n * d];
        let (mut wdg, mut wdb) = (f64s(&dgam0), f64s(&dbet0));
        ops::layernorm_backward(
            &mut wdx,
            &mut wdg,
            &mut wdb,
            &f64s(&dy),
            &f64s(&x),
            &f64s(&m32),
            &f64s(&r32),
            &f64s(&gamma),
            n,
            d,
        );
        let got = v.get(dx)?;
        v.check(
            "layernorm_backward_dx",
            size.clone(),
            &got,
            &wdx,
            tolerance::LAYERNORM_DX,
        );
        // dgamma sums dy * xhat (rtol 1e-4), dbeta sums dy alone (rtol 1e-5).
        let got = v.get(dgam)?;
        v.check(
            "layernorm_backward_params",
            format!("{size} dgamma"),
            &got,
            &wdg,
            tolerance::column_sum(n),
        );
        let got = v.get(dbet)?;
        v.check(
            "layernorm_backward_params",
            format!("{size} dbeta"),
            &got,
            &wdb,
            tolerance::column_sum(n),
        );
    }
    Ok(())
}

fn softmax<D: Device>(v: &mut V<'_, D>) -> Result<()> {
    for (heads, t) in [(1, 1), (2, 5), (3, 33), (2, 70)] {
        let batch = 2;
        let n_rows = batch * heads * t;
        let s0 = v.rv(n_rows * t, -3.0, 3.0);
        // A key mask per image: the first key always kept, some others masked out.
        let mask: Vec<f32> = (0..batch * t)
            .map(|i| {
                if i % t != 0 && i % 3 == 1 {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        let (s, dm) = (v.up(&s0)?, v.up(&mask)?);
        let scale = 0.7f32;
        v.gpu
            .softmax_rows_masked(s, Some(dm), n_rows, t, heads * t, scale)?;
        let p = v.get(s)?;
        let mut want = vec![0f64; n_rows * t];
        for r in 0..n_rows {
            let mrow = &mask[(r / (heads * t)) * t..][..t];
            let w = &mut want[r * t..(r + 1) * t];
            for j in 0..t {
                w[j] = scale as f64 * s0[r * t + j] as f64 + mrow[j] as f64;
            }
            ops::softmax_in_place(w);
        }
        let size = format!("{n_rows} rows x {t}");
        v.check("softmax_rows", size.clone(), &p, &want, tolerance::SOFTMAX);

        // Backward, unscaled (core's softmax_backward) and with an attention scale.
        let dp0 = v.rv(n_rows * t, -1.0, 1.0);
        for sc in [1.0f32, 0.25] {
            let dp = v.up(&dp0)?;
            v.gpu.softmax_backward_rows(dp, s, n_rows, t, sc)?;
            let got = v.get(dp)?;
            let mut w = vec![0f64; n_rows * t];
            ops::softmax_backward(&mut w, &f64s(&p), &f64s(&dp0), n_rows, t);
            w.iter_mut().for_each(|x| *x *= sc as f64);
            let size = format!("{size} scale {sc}");
            v.check(
                "softmax_backward_rows",
                size,
                &got,
                &w,
                tolerance::SOFTMAX_BACKWARD,
            );
        }
    }
    // No mask (a null pointer), one row per mask row.
    let (n_rows, t) = (7, 45);
    let s0 = v.rv(n_rows * t, -5.0, 5.0);
    let s = v.up(&s0)?;
    v.gpu.softmax_rows(s, n_rows, t, 1.0)?;
    let got = v.get(s)?;
    let mut want = vec![0f64; n_rows * t];
    ops::softmax_forward(&mut want, &f64s(&s0), n_rows, t);
    let size = format!("{n_rows} rows x {t} no mask");
    v.check("softmax_rows", size, &got, &want, tolerance::SOFTMAX);
    Ok(())
}

fn l2norm<D: Device>(v: &mut V<'_, D>) -> Result<()> {
    // eps 1e-12 (the head's) on plain rows; eps 1e-6 with one row far below it (the clamped
    // branch) where there are more than two rows.
    for (eps, clamp) in [(1e-12f32, false), (1e-6, true)] {
        for (n, d) in ROW_SHAPES {
            let mut x = v.rv(n * d, -1.0, 1.0);
            if clamp && n > 2 {
                x[2 * d..3 * d].iter_mut().for_each(|e| *e *= 1e-7);
            }
            let dx_ = v.up(&x)?;
            let (y, norm) = (v.out(n * d)?, v.out(n)?);
            v.gpu.l2norm_forward(y, norm, dx_, n, d, eps)?;
            let (mut wy, mut wn) = (vec![0f64; n * d], vec![0f64; n]);
            ops::l2norm_forward(&mut wy, &mut wn, &f64s(&x), n, d, eps as f64);
            let size = format!("{n}x{d} eps {eps:e}");
            let got = v.get(y)?;
            v.check(
                "l2norm_forward",
                size.clone(),
                &got,
                &wy,
                tolerance::L2NORM_ROWS,
            );
            let got = v.get(norm)?;
            let what = format!("{size} norms");
            v.check("l2norm_forward", what, &got, &wn, tolerance::L2NORM_NORMS);

            let dy = v.rv(n * d, -1.0, 1.0);
            let ddy = v.up(&dy)?;
            let dx = v.out(n * d)?;
            v.gpu.l2norm_backward(dx, ddy, y, norm, n, d, eps)?;
            let got = v.get(dx)?;
            let mut w = vec![0f64; n * d];
            ops::l2norm_backward(&mut w, &f64s(&dy), &wy, &wn, n, d, eps as f64);
            v.check(
                "l2norm_backward",
                size,
                &got,
                &w,
                tolerance::L2NORM_BACKWARD,
            );
        }
    }
    Ok(())
}

fn layernorm_large<D: Device>(l: &mut V<'_, D>, n: usize, d: usize) -> Result<()> {
    let x = l.rv(n * d, -2.0, 2.0);
    let gamma = l.rv(d, 0.5, 1.5);
    let beta = l.rv(d, -0.5, 0.5);
    // One warp per row, 4 rows per block: the first and the last block's rows.
    let rows = first_last(n, 4);
    let all: Vec<usize> = (0..d).collect();
    let (at_y, at_r) = (V::<D>::cells(&rows, &all, d), runs(&rows));
    let (dx, dg, db) = (l.up(&x)?, l.up(&gamma)?, l.up(&beta)?);
    let y = l.out_at(n * d, &at_y)?;
    let (mean, rstd) = (l.out_at(n, &at_r)?, l.out_at(n, &at_r)?);
    l.gpu
        .layernorm_forward(y, mean, rstd, dx, dg, db, n, d, 1e-6)?;
    let mut got = l.get_at(y, &at_y)?;
    got.extend(l.get_at(mean, &at_r)?);
    got.extend(l.get_at(rstd, &at_r)?);
    let (mut wy, mut wm, mut wr) = (Vec::new(), Vec::new(), Vec::new());
    for &r in &rows {
        let (mut y1, mut m1, mut r1) = (vec![0f64; d], [0f64], [0f64]);
        let xr: Vec<f64> = x[r * d..(r + 1) * d].iter().map(|&v| v as f64).collect();
        let g64: Vec<f64> = gamma.iter().map(|&v| v as f64).collect();
        let b64: Vec<f64> = beta.iter().map(|&v| v as f64).collect();
        ops::layernorm_forward(&mut y1, &mut m1, &mut r1, &xr, &g64, &b64, 1, d, 1e-6);
        wy.extend(y1);
        wm.push(m1[0]);
        wr.push(r1[0]);
    }
    wy.extend(wm);
    wy.extend(wr);
    l.check(
        "layernorm_forward",
        format!("{n}x{d}"),
        &got,
        &wy,
        tolerance::LAYERNORM_FORWARD,
    );
    Ok(())
}

/// Attention probabilities: `softmax(scale s)` over `t` keys for `n_rows` rows.
fn softmax_large<D: Device>(l: &mut V<'_, D>, n_rows: usize, t: usize, scale: f32) -> Result<()> {
    let s = l.rv(n_rows * t, -4.0, 4.0);
    let rows = first_last(n_rows, 4);
    let all: Vec<usize> = (0..t).collect();
    let at = V::<D>::cells(&rows, &all, t);
    let ds = l.up(&s)?;
    l.gpu.softmax_rows(ds, n_rows, t, scale)?;
    let got = l.get_at(ds, &at)?;
    let mut want = Vec::new();
    for &r in &rows {
        let z: Vec<f64> = s[r * t..(r + 1) * t]
            .iter()
            .map(|&v| v as f64 * scale as f64)
            .collect();
        let mx = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = z.iter().map(|v| (v - mx).exp()).sum();
        want.extend(z.iter().map(|v| (v - mx).exp() / sum));
    }
    l.check(
        "softmax_rows",
        format!("{n_rows}x{t}"),
        &got,
        &want,
        tolerance::SOFTMAX,
    );
    Ok(())
}

fn layernorm_backward_large<D: Device>(l: &mut V<'_, D>, n: usize, d: usize) -> Result<()> {
    let x = l.rv(n * d, -2.0, 2.0);
    let dy = l.rv(n * d, -1.0, 1.0);
    let gamma = l.rv(d, 0.5, 1.5);
    let dg0 = l.rv(d, -1.0, 1.0);
    let db0 = l.rv(d, -1.0, 1.0);
    // The forward's statistics, in f64 and as the f32 the kernel reads.
    let (mut mean, mut rstd) = (vec![0f64; n], vec![0f64; n]);
    for r in 0..n {
        let xr = &x[r * d..(r + 1) * d];
        let m = xr.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
        let var = xr.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / d as f64;
        mean[r] = m as f32 as f64;
        rstd[r] = (1.0 / (var + 1e-6).sqrt()) as f32 as f64;
    }
    let mean32: Vec<f32> = mean.iter().map(|&v| v as f32).collect();
    let rstd32: Vec<f32> = rstd.iter().map(|&v| v as f32).collect();
    let rows = first_last(n, 4);
    let all: Vec<usize> = (0..d).collect();
    let at_dx = V::<D>::cells(&rows, &all, d);
    // layernorm_backward_params has ceil(d / 256) blocks: the first and the last run.
    let feats = first_last(d, 256);
    let at_f = runs(&feats);
    let (dx_, dy_, xx, dm, dr, dgm) = (
        l.gpu.alloc::<f32>(n * d)?,
        l.up(&dy)?,
        l.up(&x)?,
        l.up(&mean32)?,
        l.up(&rstd32)?,
        l.up(&gamma)?,
    );
    for &(s, len) in &at_dx {
        l.gpu.upload(dx_.sub(s, len), &vec![f32::NAN; len])?;
    }
    let (dg, db) = (l.up(&dg0)?, l.up(&db0)?);
    l.gpu
        .layernorm_backward(dx_, dg, db, dy_, xx, dm, dr, dgm, n, d)?;
    let got_dx = l.get_at(dx_, &at_dx)?;
    let mut got_params = l.get_at(dg, &at_f)?;
    got_params.extend(l.get_at(db, &at_f)?);
    let (x64, dy64, g64) = (f64s(&x), f64s(&dy), f64s(&gamma));
    let (mut dg64, mut db64) = (f64s(&dg0), f64s(&db0));
    let mut dx64 = vec![0f64; n * d];
    ops::layernorm_backward(
        &mut dx64, &mut dg64, &mut db64, &dy64, &x64, &mean, &rstd, &g64, n, d,
    );
    let want_dx: Vec<f64> = rows
        .iter()
        .flat_map(|&r| dx64[r * d..(r + 1) * d].to_vec())
        .collect();
    let mut want_params: Vec<f64> = feats.iter().map(|&j| dg64[j]).collect();
    want_params.extend(feats.iter().map(|&j| db64[j]));
    l.check(
        "layernorm_backward_dx",
        format!("{n}x{d}"),
        &got_dx,
        &want_dx,
        tolerance::LAYERNORM_DX,
    );
    l.check(
        "layernorm_backward_params",
        format!("dgamma, dbeta {n}x{d}"),
        &got_params,
        &want_params,
        tolerance::column_sum(n),
    );
    Ok(())
}

/// `dp <- scale p (dp - <dp, p>)` over `t` keys for `n_rows` rows (one warp per row).
fn softmax_backward_large<D: Device>(
    l: &mut V<'_, D>,
    n_rows: usize,
    t: usize,
    scale: f32,
) -> Result<()> {
    let p = l.rv(n_rows * t, 0.0, 2.0 / t as f32);
    let dp = l.rv(n_rows * t, -1.0, 1.0);
    let rows = first_last(n_rows, 4);
    let all: Vec<usize> = (0..t).collect();
    let at = V::<D>::cells(&rows, &all, t);
    let (dpp, pp) = (l.up(&dp)?, l.up(&p)?);
    l.gpu.softmax_backward_rows(dpp, pp, n_rows, t, scale)?;
    let got = l.get_at(dpp, &at)?;
    let mut want = Vec::new();
    for &r in &rows {
        let (pr, dr) = (&p[r * t..(r + 1) * t], &dp[r * t..(r + 1) * t]);
        let dot: f64 = pr.iter().zip(dr).map(|(&a, &b)| a as f64 * b as f64).sum();
        want.extend(
            pr.iter()
                .zip(dr)
                .map(|(&a, &b)| scale as f64 * a as f64 * (b as f64 - dot)),
        );
    }
    l.check(
        "softmax_backward_rows",
        format!("{n_rows}x{t}"),
        &got,
        &want,
        tolerance::SOFTMAX_BACKWARD,
    );
    Ok(())
}

/// `y[r] = x[r] / max(||x[r]||, eps)`, `norm[r] = ||x[r]||` for `n` rows of `d`.
fn l2norm_large<D: Device>(l: &mut V<'_, D>, what: &str, n: usize, d: usize) -> Result<()> {
    let x = l.rv(n * d, -1.0, 1.0);
    let rows = first_last(n, 4);
    let all: Vec<usize> = (0..d).collect();
    let (at_y, at_n) = (V::<D>::cells(&rows, &all, d), runs(&rows));
    let dx = l.up(&x)?;
    let (y, norm) = (l.out_at(n * d, &at_y)?, l.out_at(n, &at_n)?);
    let eps = 1e-12f32;
    l.gpu.l2norm_forward(y, norm, dx, n, d, eps)?;
    let got = l.get_at(y, &at_y)?;
    let got_norms = l.get_at(norm, &at_n)?;
    let (mut want, mut norms) = (Vec::new(), Vec::new());
    for &r in &rows {
        let xr = &x[r * d..(r + 1) * d];
        let nr = xr.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
        want.extend(xr.iter().map(|&v| v as f64 / nr.max(eps as f64)));
        norms.push(nr);
    }
    let size = format!("{what} {n}x{d}");
    l.check(
        "l2norm_forward",
        size.clone(),
        &got,
        &want,
        tolerance::L2NORM_ROWS,
    );
    l.check(
        "l2norm_forward",
        format!("{size} norms"),
        &got_norms,
        &norms,
        tolerance::L2NORM_NORMS,
    );
    Ok(())
}
