//! iBOT's kernels (mask-token substitution and its backward, the row gather, the patch loss's
//! weighted cross-entropy) on the simulator against dinovmf-core, outputs poisoned first.
mod common;
use common::*;
use dinovmf_core::logits::logits_row_backward;
use dinovmf_core::loss::xent_row_forward_backward_inplace;
use dinovmf_core::ops;
use dinovmf_ptx::kernels::ibot;
use rand::Rng;

/// 0/1 row mask with about half the rows set (row 0 set, the last row clear when `n > 1`).
fn mask01(r: &mut rand_chacha::ChaCha8Rng, n: usize) -> Vec<f32> {
    let mut m: Vec<f32> = (0..n).map(|_| r.gen_range(0..2) as f32).collect();
    m[0] = 1.0;
    if n > 1 {
        m[n - 1] = 0.0;
    }
    m
}

#[test]
fn mask_tokens_forward_backward_match_core_exactly() {
    let mut r = rng(11);
    for (n, d) in [(1, 1), (7, 5), (40, 33), (300, 260)] {
        let x = rand_vec(&mut r, n * d, -2.0, 2.0);
        let token = rand_vec(&mut r, d, -1.0, 1.0);
        let mask = mask01(&mut r, n);
        let mut got = x.clone();
        launch(
            "mask_tokens_forward",
            grid1("mask_tokens_forward", n * d),
            |b| ibot::mask_tokens_forward(b, &mut got, &mask, &token, n, d),
        );
        let mut want = x.clone();
        ops::mask_tokens_forward(&mut want, &mask, &token, n, d);
        assert_close("mask_tokens_forward (exact)", &got, &want, 0.0, 0.0);
        // Masked rows really changed.
        assert!(
            got[..d] == token[..],
            "row 0 is masked and must hold the token"
        );

        let dx0 = rand_vec(&mut r, n * d, -1.0, 1.0);
        let dtok0 = rand_vec(&mut r, d, -1.0, 1.0);
        let (mut dx, mut dtok) = (dx0.clone(), dtok0.clone());
        launch(
            "mask_tokens_backward",
            grid1("mask_tokens_backward", d),
            |b| ibot::mask_tokens_backward(b, &mut dx, &mut dtok, &mask, n, d),
        );
        let (mut wdx, mut wtok) = (dx0.clone(), dtok0.clone());
        ops::mask_tokens_backward(&mut wdx, &mut wtok, &mask, n, d);
        assert_close("mask_tokens_backward dx (exact)", &dx, &wdx, 0.0, 0.0);
        assert_close(
            "mask_tokens_backward dtoken (exact)",
            &dtok,
            &wtok,
            0.0,
            0.0,
        );
        // And against f64: the token gradient is the masked rows' sum, accumulated.
        let mut w64 = to_f64(&dtok0);
        let mut dx64 = to_f64(&dx0);
        ops::mask_tokens_backward(&mut dx64, &mut w64, &to_f64(&mask), n, d);
        assert_close(
            "mask_tokens_backward dtoken (f64, rtol 1e-5, atol 5e-5: a sum of up to 300 rows)",
            &dtok,
            &w64,
            1e-5,
            5e-5,
        );
    }
}

#[test]
fn gather_rows_selects_and_zeroes() {
    let mut r = rng(12);
    for (src_rows, n, d) in [(1, 1, 1), (10, 7, 5), (50, 80, 33), (200, 130, 300)] {
        let src = rand_vec(&mut r, src_rows * d, -1.0, 1.0);
        // Some rows past the end (zeros), the rest random, repeats allowed.
        let idx: Vec<u64> = (0..n)
            .map(|i| {
                if i % 5 == 3 {
                    u64::MAX
                } else {
                    r.gen_range(0..src_rows as u64)
                }
            })
            .collect();
        let mut out = poison(n * d);
        launch("gather_rows", grid1("gather_rows", n * d), |b| {
            ibot::gather_rows(b, &mut out, &src, &idx, n, d, src_rows)
        });
        let mut want = vec![0f32; n * d];
        for (i, &s) in idx.iter().enumerate() {
            if (s as usize) < src_rows {
                want[i * d..(i + 1) * d]
                    .copy_from_slice(&src[s as usize * d..(s as usize + 1) * d]);
            }
        }
        assert_close("gather_rows (exact)", &out, &want, 0.0, 0.0);
    }
}

fn lse64(x: &[f64]) -> f64 {
    let m = x.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
    m + x.iter().map(|&v| (v - m).exp()).sum::<f64>().ln()
}

#[test]
fn xent_masked_matches_core_rows_rtol_1e4() {
    let mut r = rng(13);
    for (m_rows, t_rows, k, with_dr) in [
        (1, 1, 1, true),
        (9, 12, 255, false),
        (30, 40, 300, true),
        (3, 8, 700, true),
    ] {
        let dots = rand_vec(&mut r, m_rows * k, -1.0, 1.0);
        let scale = rand_vec(&mut r, k, 1.0, 10.0);
        let bias = rand_vec(&mut r, k, -1.0, 1.0);
        let dbias = rand_vec(&mut r, k, -1.0, 1.0);
        let mut p_t = rand_vec(&mut r, t_rows * k, -3.0, 3.0);
        for row in p_t.chunks_exact_mut(k) {
            let z = lse64(&to_f64(row));
            for x in row.iter_mut() {
                *x = (*x as f64 - z).exp() as f32;
            }
        }
        let tgt: Vec<u64> = (0..m_rows).map(|_| r.gen_range(0..t_rows as u64)).collect();
        let w = rand_vec(&mut r, m_rows, 0.01, 0.5);
        let (tau, gs) = (0.1f32, 0.7f32);
        let l64 = |i: usize| -> Vec<f64> {
            (0..k)
                .map(|j| scale[j] as f64 * dots[i * k + j] as f64 + bias[j] as f64)
                .collect()
        };
        let lse: Vec<f32> = (0..m_rows).map(|i| lse64(&l64(i)) as f32).collect();
        let dr0 = rand_vec(&mut r, k, -1.0, 1.0);
        let (mut dd, mut dr) = (dots.clone(), dr0.clone());
        let nparts = k.div_ceil(256);
        let mut lp = poison(nparts);
        launch("xent_masked", grid1("xent_masked", k), |b| {
            ibot::xent_masked(
                b,
                &mut dd,
                if with_dr { Some(&mut dr[..]) } else { None },
                &mut lp,
                &lse,
                &p_t,
                &tgt,
                &w,
                &scale,
                &bias,
                &dbias,
                tau,
                gs,
                m_rows,
                k,
            )
        });
        // core per row, in f64: the cross-entropy against one target row, then the logits'
        // backward to the dots and the radii.
        let (mut wdd, mut wdr, mut wloss) = (vec![0f64; m_rows * k], to_f64(&dr0), 0f64);
        let (sc64, db64) = (to_f64(&scale), to_f64(&dbias));
        for i in 0..m_rows {
            let mut l = l64(i);
            let t = to_f64(&p_t[tgt[i] as usize * k..(tgt[i] as usize + 1) * k]);
            let wi = w[i] as f64;
            wloss += wi * xent_row_forward_backward_inplace(&mut l, &t, 1.0, wi * gs as f64);
            logits_row_backward(
                &mut wdd[i * k..(i + 1) * k],
                if with_dr { Some(&mut wdr[..]) } else { None },
                &l,
                &to_f64(&dots[i * k..(i + 1) * k]),
                &sc64,
                &db64,
                tau as f64,
            );
        }
        let what = format!("xent_masked m{m_rows} k{k} dr={with_dr}");
        assert_close(&format!("{what} ddots"), &dd, &wdd, 1e-4, 1e-5);
        assert_close(&format!("{what} dr"), &dr, &wdr, 1e-4, 1e-5);
        let loss: f64 = lp.iter().map(|&x| x as f64).sum();
        assert_close(
            &format!("{what} loss"),
            &[loss as f32],
            &[wloss],
            1e-5,
            1e-6,
        );
    }
}
