//! iBOT's kernels on a device against core: the mask-token substitution and its backward
//! (`core::ops::mask_tokens_*`, exact), the row gather (exact), and the patch loss's weighted
//! cross-entropy (`core::loss::xent_row_forward_backward_inplace` then
//! `core::logits::logits_row_backward` per row, in f64). At the production shapes: the gather
//! of the masked student rows (about 30 % of the global crops' patches) and the patch loss
//! against the teacher's patch rows over K = 65536 (a 6.6 GB target buffer at batch 64; on the
//! simulator it is lazily zeroed and only the corner blocks' columns are written).
use anyhow::Result;
use rand::Rng;

use dinovmf_core::logits::logits_row_backward;
use dinovmf_core::loss::xent_row_forward_backward_inplace;
use dinovmf_core::ops;

use super::head::{largest_f32, lse};
use super::sample::{ends, f64s, first_last, runs};
use super::shapes::LargeShape;
use super::tolerance::{self, EXACT};
use super::V;
use crate::backend::cuda::device::Device;
use crate::backend::cuda::launch::head::LogitTerms;
use crate::backend::cuda::launch::ibot::{
    gather_rows, mask_tokens_backward, mask_tokens_forward, xent_masked, XentMasked,
};

pub(super) fn small<D: Device>(v: &mut V<'_, D>) {
    v.case("ibot", ibot);
}

pub(super) fn large<D: Device>(v: &mut V<'_, D>, s: &LargeShape) {
    let rows = s.patch_rows();
    v.case("ibot gather", |v| {
        gather_large(v, s.masked_rows, s.dim, rows)
    });
    v.case("ibot patch loss", |v| {
        patch_loss_large(v, s.masked_rows, rows, s.k)
    });
}

fn ibot<D: Device>(v: &mut V<'_, D>) -> Result<()> {
    for (n, d) in [(1, 1), (7, 5), (40, 33), (300, 260)] {
        let x = v.rv(n * d, -2.0, 2.0);
        let token = v.rv(d, -1.0, 1.0);
        let mut mask: Vec<f32> = (0..n).map(|_| v.rng.gen_range(0..2) as f32).collect();
        mask[0] = 1.0;
        let (dx_, dm, dt) = (v.up(&x)?, v.up(&mask)?, v.up(&token)?);
        mask_tokens_forward(v.gpu, dx_, dm, dt, n, d)?;
        let got = v.get(dx_)?;
        let mut w = x.clone();
        ops::mask_tokens_forward(&mut w, &mask, &token, n, d);
        let size = format!("n{n} d{d}");
        v.check("mask_tokens_forward", size.clone(), &got, &f64s(&w), EXACT);

        let g0 = v.rv(n * d, -1.0, 1.0);
        let tok0 = v.rv(d, -1.0, 1.0);
        let (dg, dtok) = (v.up(&g0)?, v.up(&tok0)?);
        mask_tokens_backward(v.gpu, dg, dtok, dm, n, d)?;
        let (mut wg, mut wt) = (f64s(&g0), f64s(&tok0));
        ops::mask_tokens_backward(&mut wg, &mut wt, &f64s(&mask), n, d);
        let got = v.get(dg)?;
        let what = format!("{size} dx");
        v.check("mask_tokens_backward", what, &got, &wg, EXACT);
        let got = v.get(dtok)?;
        let what = format!("{size} dtoken");
        v.check(
            "mask_tokens_backward",
            what,
            &got,
            &wt,
            tolerance::column_sum(n),
        );
    }

    for (src_rows, n, d) in [(1, 1, 1), (10, 7, 5), (50, 80, 33), (200, 130, 300)] {
        let src = v.rv(src_rows * d, -1.0, 1.0);
        let idx: Vec<u64> = (0..n)
            .map(|i| {
                if i % 5 == 3 {
                    u64::MAX
                } else {
                    v.rng.gen_range(0..src_rows as u64)
                }
            })
            .collect();
        let (ds, di) = (v.up(&src)?, v.up(&idx)?);
        let out = v.out(n * d)?;
        gather_rows(v.gpu, out, ds, di, (n, d, src_rows))?;
        let got = v.get(out)?;
        let mut w = vec![0f64; n * d];
        for (i, &s) in idx.iter().enumerate() {
            if (s as usize) < src_rows {
                for c in 0..d {
                    w[i * d + c] = src[s as usize * d + c] as f64;
                }
            }
        }
        v.check(
            "gather_rows",
            format!("{n} of {src_rows} rows d{d}"),
            &got,
            &w,
            EXACT,
        );
    }

    for (m, t_rows, k, with_dr) in [
        (1, 1, 1, true),
        (9, 12, 255, false),
        (30, 40, 300, true),
        (3, 8, 700, true),
    ] {
        let dots = v.rv(m * k, -1.0, 1.0);
        let scale = v.rv(k, 1.0, 10.0);
        let bias = v.rv(k, -1.0, 1.0);
        let dbias = v.rv(k, -1.0, 1.0);
        let mut p_t = v.rv(t_rows * k, -3.0, 3.0);
        for row in p_t.chunks_exact_mut(k) {
            let z = lse(row.iter().map(|&x| x as f64));
            for x in row.iter_mut() {
                *x = (*x as f64 - z).exp() as f32;
            }
        }
        let tgt: Vec<u64> = (0..m).map(|_| v.rng.gen_range(0..t_rows as u64)).collect();
        let wts = v.rv(m, 0.01, 0.5);
        let (tau, gs) = (0.1f32, 0.7f32);
        let l64 = |i: usize| -> Vec<f64> {
            (0..k)
                .map(|j| scale[j] as f64 * dots[i * k + j] as f64 + bias[j] as f64)
                .collect()
        };
        let lse32: Vec<f32> = (0..m).map(|i| lse(l64(i).into_iter()) as f32).collect();
        let dr0 = v.rv(k, -1.0, 1.0);
        let nparts = k.div_ceil(256);
        let (dd, ddr, lp) = (v.up(&dots)?, v.up(&dr0)?, v.out(nparts)?);
        let (dl, dp, dtg, dw) = (v.up(&lse32)?, v.up(&p_t)?, v.up(&tgt)?, v.up(&wts)?);
        let (ds, db, ddb) = (v.up(&scale)?, v.up(&bias)?, v.up(&dbias)?);
        let args = XentMasked {
            dots: dd,
            dr: with_dr.then_some(ddr),
            loss_part: lp,
            lse: dl,
            p_t: dp,
            tgt: dtg,
            w: dw,
            terms: LogitTerms {
                scale: ds,
                bias: db,
                dbias: ddb,
            },
            tau,
            grad_scale: gs,
            m,
            k,
            t_rows,
        };
        xent_masked(v.gpu, &args)?;
        let (mut wdd, mut wdr, mut wloss) = (vec![0f64; m * k], f64s(&dr0), 0f64);
        let (sc64, db64) = (f64s(&scale), f64s(&dbias));
        for i in 0..m {
            let mut l = l64(i);
            let tr = tgt[i] as usize;
            let t = f64s(&p_t[tr * k..(tr + 1) * k]);
            let wi = wts[i] as f64;
            wloss += wi * xent_row_forward_backward_inplace(&mut l, &t, 1.0, wi * gs as f64);
            logits_row_backward(
                &mut wdd[i * k..(i + 1) * k],
                if with_dr { Some(&mut wdr[..]) } else { None },
                &l,
                &f64s(&dots[i * k..(i + 1) * k]),
                &sc64,
                &db64,
                tau as f64,
            );
        }
        let size = format!("m{m} of {t_rows} rows k{k} dr={with_dr}");
        let got = v.get(dd)?;
        let bound = largest_f32(&scale) * gs as f64 * largest_f32(&wts);
        let tol = tolerance::xent_ddots(bound);
        v.check("xent_masked", format!("{size} ddots"), &got, &wdd, tol);
        // Each row adds `dl (dots / tau + dbias)` to dr, |dots|, |dbias| < 1: at most
        // (1 / tau + 1) max |dl|, and dl = ddots / scale.
        let big_dl = (0..m * k).fold(0f64, |a, e| a.max((wdd[e] / sc64[e % k]).abs()));
        let tol = tolerance::sum_of(m, (1.0 / tau as f64 + 1.0) * big_dl);
        let got = v.get(ddr)?;
        v.check("xent_masked", format!("{size} dr"), &got, &wdr, tol);
        let loss = v.get(lp)?.iter().map(|&x| x as f64).sum::<f64>() as f32;
        v.check(
            "xent_masked",
            format!("{size} loss"),
            &[loss],
            &[wloss],
            tolerance::LOSS,
        );
    }
    Ok(())
}

/// iBOT: the masked student rows gathered from the patch tokens (`gather_rows`), at the global
/// crops' patch count and the iBOT mask's typical number of masked rows.
fn gather_large<D: Device>(l: &mut V<'_, D>, n: usize, d: usize, src_rows: usize) -> Result<()> {
    let src = l.rv(src_rows * d, -1.0, 1.0);
    // Every index a real row (the last one included), with a few past the end (zero rows).
    let idx: Vec<u64> = (0..n)
        .map(|i| match i {
            0 => 0,
            1 => (src_rows - 1) as u64,
            2 => src_rows as u64,
            _ => l.rng.gen_range(0..src_rows as u64),
        })
        .collect();
    // One element per thread: the first and the last block's elements.
    let elems = first_last(n * d, 256);
    let at = runs(&elems);
    let dsrc = l.up(&src)?;
    let didx = l.gpu.alloc_from(&idx)?;
    let out = l.out_at(n * d, &at)?;
    gather_rows(l.gpu, out, dsrc, didx, (n, d, src_rows))?;
    let got = l.get_at(out, &at)?;
    let want: Vec<f64> = elems
        .iter()
        .map(|&e| {
            let s = idx[e / d] as usize;
            if s < src_rows {
                src[s * d + e % d] as f64
            } else {
                0.0
            }
        })
        .collect();
    l.check(
        "gather_rows",
        format!("{n}x{d} of {src_rows}"),
        &got,
        &want,
        EXACT,
    );
    Ok(())
}

/// iBOT's patch loss (`xent_masked`) at its production shape: `m` masked student rows against
/// `t_rows` teacher patch rows of K columns (`t_rows * K` = 1.6e9 at batch 64: a 6.6 GB target
/// buffer; on the simulator it is lazily zeroed and only the corner blocks' columns are
/// written). Checks the gradient on sampled rows of the first and last 256-column block, `dr`
/// on those columns (sums over every row) and the two blocks' loss parts.
fn patch_loss_large<D: Device>(l: &mut V<'_, D>, m: usize, t_rows: usize, k: usize) -> Result<()> {
    let cols = first_last(k, 256);
    let col_runs = runs(&cols);
    let nc = cols.len();
    let (tau, grad_scale) = (0.1f32, 0.5f32);
    let scale = l.rv(k, 5.0, 15.0);
    let bias = l.rv(k, -1.0, 1.0);
    let dbias = l.rv(k, -0.5, 0.5);
    let dr0 = l.rv(k, -1.0, 1.0);
    let lse = l.rv(m, 7.0, 9.0);
    let w = l.rv(m, 0.1, 1.0);
    let tgt: Vec<u64> = (0..m)
        .map(|i| match i {
            0 => 0,
            1 => (t_rows - 1) as u64,
            _ => l.rng.gen_range(0..t_rows as u64),
        })
        .collect();
    // Only the sampled columns of each row hold data (the rest is never read by these blocks).
    let dots_c = l.rv(m * nc, -0.2, 0.2);
    let pt_c = l.rv(t_rows * nc, 0.0, 1.0);
    let dots = l.gpu.alloc::<f32>(m * k)?;
    let p_t = l.gpu.alloc::<f32>(t_rows * k)?;
    for (rows, buf, vals) in [(m, dots, &dots_c), (t_rows, p_t, &pt_c)] {
        for r in 0..rows {
            let mut o = 0;
            for &(s, len) in &col_runs {
                l.gpu
                    .upload(buf.sub(r * k + s, len), &vals[r * nc + o..r * nc + o + len])?;
                o += len;
            }
        }
    }
    let (ds, db, ddb, dlse, dw) = (
        l.up(&scale)?,
        l.up(&bias)?,
        l.up(&dbias)?,
        l.up(&lse)?,
        l.up(&w)?,
    );
    let dr = l.up(&dr0)?;
    let dtgt = l.gpu.alloc_from(&tgt)?;
    let nb = k.div_ceil(256);
    let part = l.out_at(nb, &[(0, 1), (nb - 1, 1)])?;
    let args = XentMasked {
        dots,
        dr: Some(dr),
        loss_part: part,
        lse: dlse,
        p_t,
        tgt: dtgt,
        w: dw,
        terms: LogitTerms {
            scale: ds,
            bias: db,
            dbias: ddb,
        },
        tau,
        grad_scale,
        m,
        k,
        t_rows,
    };
    xent_masked(l.gpu, &args)?;
    let rows = ends(m, 3);
    let got = l.get_at(dots, &V::<D>::cells(&rows, &cols, k))?;
    let got_dr = l.get_at(dr, &col_runs)?;
    let got_part = l.get_at(part, &[(0, 1), (nb - 1, 1)])?;
    // f64 reference of the kernel's documented formula.
    let term = |i: usize, ci: usize| -> (f64, f64, f64) {
        let j = cols[ci];
        let tv = pt_c[tgt[i] as usize * nc + ci] as f64;
        let d = dots_c[i * nc + ci] as f64;
        let nls = lse[i] as f64 - (scale[j] as f64 * d + bias[j] as f64);
        let dl = ((-nls).exp() - tv) * w[i] as f64 * grad_scale as f64;
        (
            dl * scale[j] as f64,
            dl * (d / tau as f64 + dbias[j] as f64),
            w[i] as f64 * tv * nls,
        )
    };
    let mut want = Vec::new();
    for &i in &rows {
        want.extend((0..nc).map(|ci| term(i, ci).0));
    }
    let mut want_dr: Vec<f64> = cols.iter().map(|&j| dr0[j] as f64).collect();
    let mut want_part = [0f64; 2];
    let (mut big_r, mut big_loss) = (0f64, 0f64);
    for i in 0..m {
        for ci in 0..nc {
            let (_, r, loss) = term(i, ci);
            want_dr[ci] += r;
            want_part[usize::from(cols[ci] >= 256)] += loss;
            big_r = big_r.max(r.abs());
            big_loss = big_loss.max(loss.abs());
        }
    }
    let size = format!("{m}x{k} of {t_rows} rows");
    l.check(
        "xent_masked",
        format!("dL/d dots {size}"),
        &got,
        &want,
        tolerance::xent_ddots(largest_f32(&scale) * grad_scale as f64 * largest_f32(&w)),
    );
    l.check(
        "xent_masked",
        format!("dr {size}"),
        &got_dr,
        &want_dr,
        tolerance::sum_of(m, big_r),
    );
    l.check(
        "xent_masked",
        format!("loss parts {size}"),
        &got_part,
        &want_part,
        tolerance::sum_of(m * 256, big_loss),
    );
    Ok(())
}
