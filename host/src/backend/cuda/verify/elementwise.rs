//! Element-wise kernels: GELU forward and backward, the residual add, `axpy`, `fill` and
//! drop-path, against core's per-element functions. Small: one element, below, at and above
//! the 256-thread block, and wide. At the production shapes: GELU over the MLP's hidden
//! activations (25,216 x 4d elements; the first and the last 256-element block hold data).
use anyhow::Result;

use dinovmf_core::ops;

use super::sample::{f64s, first_last, runs};
use super::shapes::LargeShape;
use super::tolerance::{self, EXACT};
use super::V;
use crate::backend::cuda::device::Device;

pub(super) fn small<D: Device>(v: &mut V<'_, D>) {
    v.case("elementwise", elementwise);
}

pub(super) fn large<D: Device>(v: &mut V<'_, D>, s: &LargeShape) {
    v.case("mlp gelu", |v| gelu_large(v, s.tokens() * 4 * s.dim));
}

const EW_SIZES: [usize; 4] = [1, 255, 256, 1000];

fn elementwise<D: Device>(v: &mut V<'_, D>) -> Result<()> {
    for n in EW_SIZES {
        let x = v.rv(n, -4.0, 4.0);
        let dy = v.rv(n, -1.0, 1.0);
        let (dx_, ddy) = (v.up(&x)?, v.up(&dy)?);
        let y = v.out(n)?;
        v.gpu.gelu_forward(y, dx_, n)?;
        let got = v.get(y)?;
        let mut w = vec![0f64; n];
        ops::gelu_forward(&mut w, &f64s(&x));
        v.check("gelu_forward", format!("n {n}"), &got, &w, tolerance::GELU);
        let dx = v.out(n)?;
        v.gpu.gelu_backward(dx, dx_, ddy, n)?;
        let got = v.get(dx)?;
        ops::gelu_backward(&mut w, &f64s(&x), &f64s(&dy));
        v.check("gelu_backward", format!("n {n}"), &got, &w, tolerance::GELU);

        let f = v.rv(n, -2.0, 2.0);
        let df = v.up(&f)?;
        let y = v.out(n)?;
        v.gpu.residual(y, dx_, df, n)?;
        let got = v.get(y)?;
        let w: Vec<f64> = x.iter().zip(&f).map(|(&a, &b)| (a + b) as f64).collect();
        v.check("residual_forward", format!("n {n}"), &got, &w, EXACT);

        let acc = v.up(&f)?;
        v.gpu.axpy(acc, dx_, 0.5, n)?;
        let got = v.get(acc)?;
        let w: Vec<f64> = f
            .iter()
            .zip(&x)
            .map(|(&a, &b)| (a + 0.5 * b) as f64)
            .collect();
        v.check("axpy", format!("n {n}"), &got, &w, EXACT);

        let z = v.out(n)?;
        v.gpu.fill(z, 0.25)?;
        let got = v.get(z)?;
        v.check("fill", format!("n {n}"), &got, &vec![0.25; n], EXACT);
    }
    for (batch, per) in [(1, 7), (3, 100), (5, 256)] {
        let x = v.rv(batch * per, -2.0, 2.0);
        let mask: Vec<f32> = (0..batch).map(|i| (i % 2) as f32).collect();
        let (dx, dm) = (v.up(&x)?, v.up(&mask)?);
        let y = v.out(batch * per)?;
        v.gpu.drop_path(y, dx, dm, 0.8, batch, per)?;
        let got = v.get(y)?;
        let mut w = vec![0f32; batch * per];
        ops::drop_path_forward(&mut w, &x, &mask, 0.8, batch, per);
        v.check(
            "drop_path",
            format!("{batch}x{per}"),
            &got,
            &f64s(&w),
            EXACT,
        );
    }
    Ok(())
}

fn gelu_large<D: Device>(l: &mut V<'_, D>, n: usize) -> Result<()> {
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
    l.check("gelu_forward", format!("{n}"), &got, &wy, tolerance::GELU);
    let got = l.get_at(dx, &at)?;
    l.check("gelu_backward", format!("{n}"), &got, &wdx, tolerance::GELU);
    Ok(())
}
