//! Element-wise and per-row kernels at production sizes: GELU forward and backward over the
//! MLP's hidden activations (25,216 x 4d elements; one thread per element, the first and the
//! last 256-element block hold data), the L2 normalisation of the prototypes and of the student
//! outputs (one warp per row), and the teacher's row entropies over K = 65536.
use anyhow::Result;

use dinovmf_core::ops;

use super::{first_last, runs, L};
use crate::backend::cuda::device::Device;
use crate::backend::cuda::launch::head as launch;

pub(super) fn gelu<D: Device>(l: &mut L<'_, D>, n: usize) -> Result<()> {
    let elems = first_last(n, 256);
    let at = runs(&elems);
    let x_c = l.rv(elems.len(), -4.0, 4.0);
    let dy_c = l.rv(elems.len(), -1.0, 1.0);
    let (x, dy) = (l.gpu.alloc::<f32>(n)?, l.gpu.alloc::<f32>(n)?);
    let mut o = 0;
    for &(s, len) in &at {
        l.gpu.upload(x.sub(s, len), &x_c[o..o + len])?;
        l.gpu.upload(dy.sub(s, len), &dy_c[o..o + len])?;
        o += len;
    }
    let (y, dx) = (l.out_at(n, &at)?, l.out_at(n, &at)?);
    l.gpu.gelu_forward(y, x, n)?;
    l.gpu.gelu_backward(dx, x, dy, n)?;
    let x64: Vec<f64> = x_c.iter().map(|&v| v as f64).collect();
    let dy64: Vec<f64> = dy_c.iter().map(|&v| v as f64).collect();
    let (mut wy, mut wdx) = (vec![0f64; x64.len()], vec![0f64; x64.len()]);
    ops::gelu_forward(&mut wy, &x64);
    ops::gelu_backward(&mut wdx, &x64, &dy64);
    let got = l.get_at(y, &at)?;
    l.check("gelu_forward", format!("{n}"), &got, &wy, (1e-5, 1e-6));
    let got = l.get_at(dx, &at)?;
    l.check("gelu_backward", format!("{n}"), &got, &wdx, (1e-5, 1e-6));
    Ok(())
}

/// `y[r] = x[r] / max(||x[r]||, eps)`, `norm[r] = ||x[r]||` for `n` rows of `d`.
pub(super) fn l2norm<D: Device>(l: &mut L<'_, D>, what: &str, n: usize, d: usize) -> Result<()> {
    let x = l.rv(n * d, -1.0, 1.0);
    let rows = first_last(n, 4);
    let all: Vec<usize> = (0..d).collect();
    let (at_y, at_n) = (L::<D>::cells(&rows, &all, d), runs(&rows));
    let dx = l.up(&x)?;
    let (y, norm) = (l.out_at(n * d, &at_y)?, l.out_at(n, &at_n)?);
    let eps = 1e-12f32;
    l.gpu.l2norm_forward(y, norm, dx, n, d, eps)?;
    let mut got = l.get_at(y, &at_y)?;
    got.extend(l.get_at(norm, &at_n)?);
    let (mut want, mut norms) = (Vec::new(), Vec::new());
    for &r in &rows {
        let xr = &x[r * d..(r + 1) * d];
        let nr = xr.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
        want.extend(xr.iter().map(|&v| v as f64 / nr.max(eps as f64)));
        norms.push(nr);
    }
    want.extend(norms);
    l.check(
        "l2norm_forward",
        format!("{what} {n}x{d}"),
        &got,
        &want,
        (1e-5, 1e-6),
    );
    Ok(())
}

/// `ent[r] = -sum_j p ln p` of `rows` distributions over `k` (one block per row).
pub(super) fn row_entropy<D: Device>(l: &mut L<'_, D>, rows: usize, k: usize) -> Result<()> {
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
        (1e-5, 1e-5),
    );
    Ok(())
}
