//! iBOT's kernels on a device against core: the mask-token substitution and its backward
//! (`core::ops::mask_tokens_*`, exact), the row gather (exact), and the patch loss's weighted
//! cross-entropy (`core::loss::xent_row_forward_backward_inplace` then
//! `core::logits::logits_row_backward` per row, in f64).
use anyhow::Result;
use rand::Rng;

use dinovmf_core::logits::logits_row_backward;
use dinovmf_core::loss::xent_row_forward_backward_inplace;
use dinovmf_core::ops;

use super::{f64s, lse, Device, V};
use crate::backend::cuda::launch::head::LogitTerms;
use crate::backend::cuda::launch::ibot::{
    gather_rows, mask_tokens_backward, mask_tokens_forward, xent_masked, XentMasked,
};

pub(super) fn ibot<D: Device>(v: &mut V<'_, D>) -> Result<()> {
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
        v.check(
            "mask_tokens_forward",
            size.clone(),
            &got,
            &f64s(&w),
            0.0,
            0.0,
        );

        let g0 = v.rv(n * d, -1.0, 1.0);
        let tok0 = v.rv(d, -1.0, 1.0);
        let (dg, dtok) = (v.up(&g0)?, v.up(&tok0)?);
        mask_tokens_backward(v.gpu, dg, dtok, dm, n, d)?;
        let (mut wg, mut wt) = (f64s(&g0), f64s(&tok0));
        ops::mask_tokens_backward(&mut wg, &mut wt, &f64s(&mask), n, d);
        let got = v.get(dg)?;
        let what = format!("{size} dx");
        v.check("mask_tokens_backward", what, &got, &wg, 0.0, 0.0);
        // The token's gradient is an f32 sum of up to 300 rows of magnitude 1.
        let got = v.get(dtok)?;
        let what = format!("{size} dtoken");
        v.check("mask_tokens_backward", what, &got, &wt, 1e-5, 5e-5);
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
            0.0,
            0.0,
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
        let mut got = v.get(dd)?;
        got.extend(v.get(ddr)?);
        let mut want = wdd;
        want.extend(wdr);
        v.check(
            "xent_masked",
            format!("{size} ddots, dr"),
            &got,
            &want,
            1e-4,
            1e-5,
        );
        let loss = v.get(lp)?.iter().map(|&x| x as f64).sum::<f64>() as f32;
        v.check(
            "xent_masked",
            format!("{size} loss"),
            &[loss],
            &[wloss],
            1e-5,
            1e-6,
        );
    }
    Ok(())
}
