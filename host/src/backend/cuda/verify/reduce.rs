//! The gradient reductions against f64: `reduce_segments` (per-chunk sums, sums of squares and
//! largest magnitudes over segments below, at and across the 4096-element chunk), the final
//! per-segment combination and the clip coefficient, the scaling of segments by it, and the
//! column sums that reduce a batch's rows.
use anyhow::Result;

use super::report::compare;
use super::sample::f64s;
use super::tolerance::{self, EXACT};
use super::V;
use crate::backend::cuda::device::Device;
use crate::backend::cuda::launch::reduce::{clip_coef, scale_segments};
use crate::backend::cuda::ops::Segments;

pub(super) fn small<D: Device>(v: &mut V<'_, D>) {
    v.case("reductions", reductions);
}

fn reductions<D: Device>(v: &mut V<'_, D>) -> Result<()> {
    use dinovmf_ptx::kernels::reduce::{RedOp, CHUNK};
    // Segments: empty-ish, below and across the 4096-element chunk, and large.
    let lens = [1usize, 255, 4096, 4097, 10000, 33];
    let mut segs = Vec::new();
    let mut off = 0;
    for &l in &lens {
        segs.push((off, l));
        off += l + 3;
    }
    let total = off;
    let x = v.rv(total, -1.0, 1.0);
    let sg = Segments::new(v.gpu, &segs)?;
    let dx = v.up(&x)?;
    let parts = sg.parts();
    let size = format!("{} segments, {total} values", lens.len());
    {
        let vals = f64s(&x);
        for op in [RedOp::Sum, RedOp::SumSq, RedOp::MaxAbs] {
            let part = v.out(lens.len() * parts)?;
            let name = "reduce_segments_f32";
            v.gpu.reduce_segments(part, dx, &sg, op)?;
            let got = v.get(part)?;
            let mut want = Vec::new();
            for &(o, l) in &segs {
                for pi in 0..parts {
                    let lo = (pi * CHUNK).min(l);
                    let hi = ((pi + 1) * CHUNK).min(l);
                    let s = &vals[o + lo..o + hi];
                    want.push(match op {
                        RedOp::Sum => s.iter().sum(),
                        RedOp::SumSq => s.iter().map(|a| a * a).sum(),
                        RedOp::MaxAbs => s.iter().fold(0.0, |a: f64, b| a.max(b.abs())),
                    });
                }
            }
            v.check(
                name,
                format!("{size} op {}", op.code()),
                &got,
                &want,
                if op == RedOp::Sum {
                    tolerance::REDUCE_SUM
                } else {
                    tolerance::REDUCE_RELATIVE
                },
            );
        }
    }
    for (parts, nseg) in [(1, 1), (3, 7), (40, 300)] {
        let part = v.rv(parts * nseg, 0.0, 2.0);
        let dp = v.up(&part)?;
        for op in [RedOp::Sum, RedOp::MaxAbs] {
            let out = v.out(nseg)?;
            v.gpu.reduce_final(out, dp, parts, nseg, op, 0.5)?;
            let got = v.get(out)?;
            let want: Vec<f64> = part
                .chunks_exact(parts)
                .map(|p| {
                    if op == RedOp::MaxAbs {
                        p.iter().fold(0.0f64, |a, &b| a.max(b as f64))
                    } else {
                        0.5 * p.iter().map(|&b| b as f64).sum::<f64>()
                    }
                })
                .collect();
            v.check(
                "reduce_final",
                format!("{nseg} seg x {parts} parts op {}", op.code()),
                &got,
                &want,
                tolerance::CLIP_SCALARS,
            );
        }
        let (coef, norm) = (v.out(nseg)?, v.out(nseg)?);
        let clip = 1.5f64;
        clip_coef(v.gpu, coef, norm, dp, (parts, nseg), clip)?;
        let mut got = v.get(norm)?;
        got.extend(v.get(coef)?);
        let norms: Vec<f64> = part
            .chunks_exact(parts)
            .map(|p| p.iter().map(|&b| b as f64).sum::<f64>().sqrt())
            .collect();
        let mut want = norms.clone();
        want.extend(norms.iter().map(|&nr| (clip / (nr + 1e-6)).min(1.0)));
        v.check(
            "clip_coef",
            format!("{nseg} seg x {parts} parts"),
            &got,
            &want,
            tolerance::CLIP_SCALARS,
        );
    }
    {
        let coef: Vec<f32> = (0..segs.len())
            .map(|i| {
                if i % 2 == 0 {
                    1.0
                } else {
                    0.37 + i as f32 * 0.1
                }
            })
            .collect();
        let dc = v.up(&coef)?;
        let g = v.up(&x)?;
        scale_segments(v.gpu, g, &sg, dc)?;
        let got = v.get(g)?;
        let mut want = x.clone();
        for (s, &(o, l)) in segs.iter().enumerate() {
            for e in &mut want[o..o + l] {
                if coef[s] != 1.0 {
                    *e *= coef[s];
                }
            }
        }
        v.check("scale_segments", size.clone(), &got, &f64s(&want), EXACT);
    }
    // Per-tensor clipping as the step runs it (sums of squares, coefficients, scaling) against
    // core's clip_grad_tensor per tensor; the gaps between tensors stay untouched.
    {
        let g0 = v.rv(total, -0.2, 0.2);
        let clip = 3.0f64;
        let g = v.up(&g0)?;
        let part = v.out(lens.len() * parts)?;
        v.gpu.reduce_segments(part, g, &sg, RedOp::SumSq)?;
        let (coef, norm) = (v.out(sg.n)?, v.out(sg.n)?);
        clip_coef(v.gpu, coef, norm, part, (parts, sg.n), clip)?;
        scale_segments(v.gpu, g, &sg, coef)?;
        let mut wg = g0.clone();
        let wnorm: Vec<f64> = segs
            .iter()
            .map(|&(o, l)| dinovmf_core::optim::clip_grad_tensor(&mut wg[o..o + l], clip))
            .collect();
        let coefs = v.get(coef)?;
        let mut row = compare(
            "clip_coef",
            &format!("{size}: norms vs core clip_grad_tensor"),
            &v.get(norm)?,
            &wnorm,
            tolerance::CLIP_SCALARS,
        );
        // The case must clip some tensors and leave others.
        if !(coefs.iter().any(|&c| c < 1.0) && coefs.contains(&1.0)) {
            row.ok = false;
            row.note = format!("clips all or none: coefficients {coefs:?}");
        }
        v.rows.push(row);
        let got = v.get(g)?;
        let what = format!("{size}: clipped vs core clip_grad_tensor, gaps untouched");
        v.check(
            "scale_segments",
            what,
            &got,
            &f64s(&wg),
            tolerance::CLIP_SCALARS,
        );
    }
    for (rows, cols) in [(1, 1), (37, 300), (130, 257)] {
        let xs = v.rv(rows * cols, -1.0, 1.0);
        let d32 = v.up(&xs)?;
        for accumulate in [false, true] {
            let o0 = v.rv(cols, -1.0, 1.0);
            let out = if accumulate { v.up(&o0)? } else { v.out(cols)? };
            let name = "column_sum_f32";
            v.gpu.column_sum(out, d32, rows, cols, accumulate)?;
            let got = v.get(out)?;
            let want: Vec<f64> = (0..cols)
                .map(|c| {
                    let s: f64 = (0..rows).map(|r| xs[r * cols + c] as f64).sum();
                    s + if accumulate { o0[c] as f64 } else { 0.0 }
                })
                .collect();
            v.check(
                name,
                format!("{rows}x{cols} acc={accumulate}"),
                &got,
                &want,
                tolerance::column_sum(rows),
            );
        }
    }
    Ok(())
}
