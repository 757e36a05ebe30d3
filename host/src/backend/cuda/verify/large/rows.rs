//! Row kernels' backward passes at production shapes: LayerNorm's `dx` (one warp per row, the
//! first and the last block's rows) and its parameter gradients (one thread per feature, each
//! summing all 25,216 rows), and the attention softmax backward.
use anyhow::Result;

use dinovmf_core::ops;

use super::{first_last, runs, L};
use crate::backend::cuda::device::Device;

pub(super) fn layernorm_backward<D: Device>(l: &mut L<'_, D>, n: usize, d: usize) -> Result<()> {
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
    let at_dx = L::<D>::cells(&rows, &all, d);
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
    let mut got = l.get_at(dx_, &at_dx)?;
    got.extend(l.get_at(dg, &at_f)?);
    got.extend(l.get_at(db, &at_f)?);
    let f64s = |v: &[f32]| -> Vec<f64> { v.iter().map(|&a| a as f64).collect() };
    let (x64, dy64, g64) = (f64s(&x), f64s(&dy), f64s(&gamma));
    let (mut dg64, mut db64) = (f64s(&dg0), f64s(&db0));
    let mut dx64 = vec![0f64; n * d];
    ops::layernorm_backward(
        &mut dx64, &mut dg64, &mut db64, &dy64, &x64, &mean, &rstd, &g64, n, d,
    );
    let mut want: Vec<f64> = rows
        .iter()
        .flat_map(|&r| dx64[r * d..(r + 1) * d].to_vec())
        .collect();
    want.extend(feats.iter().map(|&j| dg64[j]));
    want.extend(feats.iter().map(|&j| db64[j]));
    // dgamma / dbeta: f32 sums of n ~ 25k terms of size ~1.
    l.check(
        "layernorm_backward",
        format!("dx, dgamma, dbeta {n}x{d}"),
        &got,
        &want,
        (1e-4, 1e-4 * (n as f64).sqrt() / 16.0),
    );
    Ok(())
}

/// `dp <- scale p (dp - <dp, p>)` over `t` keys for `n_rows` rows (one warp per row).
pub(super) fn softmax_backward<D: Device>(
    l: &mut L<'_, D>,
    n_rows: usize,
    t: usize,
    scale: f32,
) -> Result<()> {
    let p = l.rv(n_rows * t, 0.0, 2.0 / t as f32);
    let dp = l.rv(n_rows * t, -1.0, 1.0);
    let rows = first_last(n_rows, 4);
    let all: Vec<usize> = (0..t).collect();
    let at = L::<D>::cells(&rows, &all, t);
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
        (1e-5, 1e-7),
    );
    Ok(())
}
